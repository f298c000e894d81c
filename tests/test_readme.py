"""The README cannot drift: its test block is what CI runs, and every command it shows parses as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from siim_jax import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)


def _commands(prefix: str) -> list[str]:
    lines = (line.strip() for block in BASH_BLOCKS for line in block.splitlines())
    found = []
    for line in lines:
        line = line.split(" # ")[0].strip()
        for part in line.split("&&"):
            if part.strip().startswith(prefix):
                found.append(part.strip())
    return found


def _code_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readme_test_block():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_block = ci.split("# --- README: tests")[1].split("# --- end ---")[0].split("\n", 1)[1]
    readme_block = next(block for block in BASH_BLOCKS if "pytest" in block)
    assert _code_lines(ci_block) == _code_lines(readme_block)


SIIM_COMMANDS = _commands("siim-jax ")


def test_readme_shows_every_subcommand():
    shown = {shlex.split(command)[1] for command in SIIM_COMMANDS}
    assert shown == set(cli.COMMANDS)


@pytest.mark.parametrize("command", SIIM_COMMANDS)
def test_readme_command_parses(command):
    module, args = cli.parse_command(shlex.split(command)[1:])
    assert callable(module.run) and args is not None


@pytest.mark.parametrize("command", _commands("python tools/"))
def test_readme_tool_has_help(command):
    script = shlex.split(command)[1]
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
