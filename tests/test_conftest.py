"""The reference guard of conftest: a missing reference skips a test locally and fails it under CI=true."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import missing_reference, reference_import

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hidden_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ModuleNotFoundError


def test_missing_reference_skips_locally(hidden_torch, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="'torch'"):
        reference_import("torch")
    with pytest.raises(pytest.skip.Exception, match="real challenge files"):
        missing_reference("real challenge files not found")


def test_missing_reference_fails_under_ci(hidden_torch, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="'torch'.*CI=true"):
        reference_import("torch")
    with pytest.raises(pytest.fail.Exception, match="real challenge files.*CI=true"):
        missing_reference("real challenge files not found")


def test_present_reference_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert reference_import("numpy.linalg") is sys.modules["numpy.linalg"]


@pytest.mark.parametrize("ci, outcome", [(None, "1 skipped"), ("true", "1 failed")])
def test_a_reference_test_without_its_reference(tmp_path, ci, outcome):
    # A real reference test, run by pytest with scikit-learn hidden by a plugin loaded before collection.
    (tmp_path / "hide_sklearn.py").write_text("import sys\n\nsys.modules['sklearn'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    env.pop("CI", None)
    if ci:
        env["CI"] = ci
    test = "tests/test_metrics.py::test_auc_matches_sklearn"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "hide_sklearn", "-p", "no:cacheprovider", test]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert outcome in completed.stdout, completed.stdout[-2000:]
    assert (completed.returncode == 0) == (ci is None)


def test_xdist_groups_keep_their_tests_on_one_worker(tmp_path):
    # The suite's minutes-long module fixtures are built once because `--dist loadgroup` sends a group's tests to
    # one worker. pytest 9.2 silently broke that (pytest-xdist#1386: the group suffix no longer reaches the node
    # id), which doubled those fixtures on CI; this catches such a pairing of versions.
    (tmp_path / "test_grouped.py").write_text(
        "import os\nimport pytest\n\n\n"
        "@pytest.mark.xdist_group('g')\n@pytest.mark.parametrize('i', range(6))\n"
        "def test_grouped(i):\n    print('WORKER', os.environ['PYTEST_XDIST_WORKER'])\n\n\n"
        "@pytest.mark.parametrize('i', range(6))\ndef test_free(i):\n    pass\n"
    )
    command = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-rA", "-p", "no:cacheprovider",
               "-o", "addopts=", str(tmp_path / "test_grouped.py")]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:]
    workers = set(re.findall(r"WORKER (gw\d+)", completed.stdout))
    assert len(re.findall(r"WORKER gw\d+", completed.stdout)) == 6
    assert len(workers) == 1, f"the group 'g' ran on {sorted(workers)}"
