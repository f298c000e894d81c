"""The README cannot drift: its test block is what CI runs, and what it shows runs.

- `siim-jax train` lines (`srun` included) load their config and apply their overrides exactly as the command does,
  with DATA a synthetic tree and RUNS a scratch folder: a renamed or unknown key fails. The model each one names
  is built (abstractly).
- `synth` and `prepare` lines run on a small synthetic tree, their image counts and size shrunk; `convert ... --source
  smp` of a whole Unet (`unet.pth`) runs on a random smp Unet of the architecture it names.
- The other `siim-jax` lines (demo, tune, evaluate, predict, convert of downloaded ImageNet weights) parse with the real
  parser: they need a trained checkpoint or a download, and tests/test_demo.py runs a tiny demo.
- `python tools/...` lines run with --help; every Python block runs on synthetic data (the onnxruntime one on a
  small exported model and DICOM); every recipe in the recipe table loads.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from siim_jax.configs.defaults import default_model_config

from siim_jax import cli, config_utils
from siim_jax.inference.export import export_checkpoint
from siim_jax.inference.predictor import Inference
from siim_jax.models import build_model
from siim_jax.models.io import save_model

from . import dicom_factory
from .conftest import reference_import
from .helpers import EXPORT_TOLERANCE, N_TRAIN, calibrated_model, smooth_grey

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
# Values that make a README line cheap to run, by flag: images to write, training size.
SHRUNK = {"--n-train": "6", "--n-test": "2", "--size": "32"}


def _commands(program: str) -> list[str]:
    """Every command of the bash blocks that runs `program` (after `&&` or a launcher such as srun), comments cut."""
    found = []
    for line in (line.split(" # ")[0].strip() for block in BASH_BLOCKS for line in block.splitlines()):
        for part in line.split("&&"):
            words = part.split()
            if program in words:
                found.append(" ".join(words[words.index(program) :]))
    return found


def _code_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _argv(command: str, data: Path, shrink: bool = False) -> list[str]:
    """The arguments of a README `siim-jax` line, DATA and RUNS replaced; with `shrink`, SHRUNK's values."""
    words = shlex.split(command)[1:]
    words = [re.sub(r"\bDATA\b", str(data), re.sub(r"\bRUNS\b", "runs", word)) for word in words]
    if shrink:
        words = [SHRUNK.get(before, word) for before, word in zip(["", *words], words)]
    return words


SIIM_COMMANDS = _commands("siim-jax")
TRAIN_COMMANDS = [command for command in SIIM_COMMANDS if command.split()[1] == "train"]
RUN_COMMANDS = [
    command for command in SIIM_COMMANDS
    if command.split()[1] in ("synth", "prepare") or command.startswith("siim-jax convert unet.pth")
]


def test_ci_runs_the_readme_test_block():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_block = ci.split("# --- README: tests")[1].split("# --- end ---")[0].split("\n", 1)[1]
    readme_block = next(block for block in BASH_BLOCKS if "pytest" in block)
    assert _code_lines(ci_block) == _code_lines(readme_block)


def test_readme_shows_every_subcommand():
    assert {command.split()[1] for command in SIIM_COMMANDS} == set(cli.COMMANDS)
    assert len(TRAIN_COMMANDS) >= 2 and any("--config." in command for command in TRAIN_COMMANDS)


@pytest.mark.parametrize("command", SIIM_COMMANDS)
def test_readme_command_parses(command, synthetic_tree):
    """Each line parses into its verb's module, and every `--flag value` of the line reaches the arguments (the
    predict, tune and evaluate lines also run: tests/test_predict.py::test_briefly_trained_run_...)."""
    argv = _argv(command, synthetic_tree)
    module, args = cli.parse_command(argv)
    assert module.__name__ == f"siim_jax.commands.{argv[0]}"
    given = {}
    for flag, value in zip(argv[1:], argv[2:]):
        if flag.startswith("--") and flag != "--config" and not value.startswith("--"):
            given.setdefault(flag[2:].replace("-", "_"), []).append(value)
    for name, values in given.items():
        parsed = getattr(args, name)
        parsed = [_as_typed(item) for item in (parsed if isinstance(parsed, list) else [parsed])]
        assert parsed == values or [",".join(parsed)] == values, (name, values, parsed)


def _as_typed(item) -> str:
    """An argument value as the README writes it: a (height, width) shape as HxW."""
    return "x".join(map(str, item)) if isinstance(item, tuple) else str(item)


def _load_train_config(command: str, data: Path):
    """The config `siim-jax train` builds from a README line: its recipe, arg and overrides, through the CLI."""
    _, args = cli.parse_command(_argv(command, data))
    return args.config


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_readme_train_command_loads_its_config_and_overrides(command, synthetic_tree):
    config = _load_train_config(command, synthetic_tree)
    assert config.data.root == str(synthetic_tree)  # the recipe's arg is the data root
    for word in _argv(command, synthetic_tree):
        if word.startswith("--config."):
            key, value = word.removeprefix("--config.").split("=", 1)
            node = config
            for part in key.split("."):
                node = node[part]
            assert str(node) == value, key
    nnx.eval_shape(lambda: build_model(config.model))


def test_a_readme_train_line_with_a_renamed_key_fails(synthetic_tree, capsys):
    """What the test above guards against: the README's own line, one key renamed as a refactor might."""
    command = next(command for command in TRAIN_COMMANDS if "--config.data.prepared_dir=" in command)
    renamed = command.replace("--config.data.prepared_dir=", "--config.data.prepared_folder=")
    with pytest.raises(SystemExit) as exit_info:
        _load_train_config(renamed, synthetic_tree)
    assert exit_info.value.code == 2
    assert "unknown config key 'data.prepared_folder'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _load_train_config(command.replace("--config unet_resnet50", "--config unet_resnet_50"), synthetic_tree)


@pytest.fixture(scope="module")
def smp_unet_pth(tmp_path_factory) -> tuple[Path, object]:
    """A random smp Unet of the architecture the README converts, saved as unet.pth; returns the file and the
    PyTorch model (in eval mode)."""
    torch = reference_import("torch")
    smp = reference_import("segmentation_models_pytorch")
    arch = re.search(r'convert\("unet\.pth", source="smp", arch="unet_(\w+)"\)', README).group(1)
    torch.manual_seed(0)
    model = smp.Unet(arch, encoder_weights=None, classes=1).eval()
    path = tmp_path_factory.mktemp("smp") / "unet.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture
def readme_folder(tmp_path, synthetic_tree, monkeypatch) -> Path:
    """A scratch working folder for README lines: DATA/ is a copy of the synthetic tree (lines write into it)."""
    shutil.copytree(synthetic_tree, tmp_path / "DATA")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _output_folder(argv: list[str]) -> Path:
    """Where a synth, prepare or convert command writes."""
    return Path({"synth": argv[1], "convert": argv[2]}.get(argv[0]) or argv[argv.index("--out") + 1])


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_readme_command_runs_on_synthetic_data(command, readme_folder, request):
    argv = _argv(command, readme_folder / "DATA", shrink=True)
    if argv[0] == "convert":
        path, _ = request.getfixturevalue("smp_unet_pth")
        shutil.copy(path, argv[1])
    assert cli.main(argv) == 0
    assert any(_output_folder(argv).iterdir())


def test_readme_convert_block_runs_and_matches_pytorch(smp_unet_pth, tmp_path, monkeypatch):
    torch = reference_import("torch")
    path, reference = smp_unet_pth
    block = next(block for block in PYTHON_BLOCKS if "convert(" in block)
    monkeypatch.chdir(path.parent)
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
    namespace = {"x": jax.numpy.asarray(x)}
    exec(block, namespace)
    assert namespace["class_logits"] is None  # as the block says: this Unet has no classification head
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(namespace["mask_logits"], expected, atol=1e-4 * np.abs(expected).max())


def test_readme_data_format_block_runs(synthetic_tree, tmp_path, monkeypatch, capsys):
    block = next(block for block in PYTHON_BLOCKS if "decode_rle(" in block)
    (tmp_path / "DATA").symlink_to(synthetic_tree)
    monkeypatch.chdir(tmp_path)
    path = sorted((synthetic_tree / "dicom-images-train").rglob("*.dcm"))[0]
    namespace = {"path": path}
    exec(block, namespace)
    assert namespace["image"].image_id == path.stem and namespace["image"].pixels.dtype == np.uint8
    assert namespace["mask"].shape == (1024, 1024) and namespace["mask"].sum() == 2 + 8
    assert namespace["text"] == "557374 2 1015 8"  # the encoding gives back what was decoded
    assert len(namespace["index"].frame) == N_TRAIN and "images" in capsys.readouterr().out


@pytest.mark.xdist_group("export")  # with tests/test_export.py, which has imported jax2onnx's plugins
def test_readme_onnx_block_scores_a_dicom_as_predict_does(tmp_path, monkeypatch):
    """The block on an exported ResNet18 UNet and a non-square DICOM gives `predict`'s probabilities, TTA off."""
    reference_import("onnxruntime")
    block = next(block for block in PYTHON_BLOCKS if "onnxruntime" in block)
    model_config = default_model_config()
    model_config.update(encoder="resnet18", decoder_channels=(32, 16, 16, 8, 8))
    calibration = np.stack([smooth_grey((64, 64), seed) for seed in range(4)])
    save_model(tmp_path / "model", calibrated_model(model_config, calibration), model_config)
    export_checkpoint(tmp_path / "model", tmp_path / "unet.onnx", "onnx", image_size=64)
    dicom_factory.save(dicom_factory.dataset(smooth_grey((80, 96), seed=5)), tmp_path / "image.dcm")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(block, namespace)
    inference = Inference.from_checkpoint(tmp_path / "model", image_size=64, batch_size=1, tta=False, progress=False)
    (prediction,) = inference.predictions([("image", str(tmp_path / "image.dcm"))])
    assert np.max(np.abs(namespace["mask_probability"][0] - prediction.prob)) <= EXPORT_TOLERANCE
    assert abs(namespace["class_probability"][0] - prediction.class_prob) <= EXPORT_TOLERANCE


def test_every_recipe_in_the_readme_loads():
    table = re.findall(r"^\| `(\w+)` \|", README, flags=re.MULTILINE)
    recipes = [name for name in table if name in README.split("| config | recipe |")[1].split("\n\n")[0]]
    assert sorted(recipes) == config_utils.packaged_configs()
    for name in recipes:
        config = config_utils.load_config(name)
        nnx.eval_shape(lambda config=config: build_model(config.model))


@pytest.mark.parametrize("command", [c for c in _commands("python") if c.split()[1].startswith("tools/")])
def test_readme_tool_has_help(command):
    script = shlex.split(command)[1]
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_readme_python_blocks_use_only_the_public_api():
    import ast

    import siim_jax

    for block in PYTHON_BLOCKS:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("siim_jax") for alias in node.names), ast.unparse(node)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("siim_jax"):
                assert node.module == "siim_jax", f"README imports from {node.module}: {ast.unparse(node)}"
                assert {alias.name for alias in node.names} <= set(siim_jax.__all__), ast.unparse(node)
