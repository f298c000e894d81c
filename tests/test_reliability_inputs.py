"""Bad inputs: the corpus of `tests.bad_inputs` (one test id per case), training over bad inputs in lenient and
strict mode, a disk that fills mid-run, and untrusted input (ImageIds, pickles, overrides) kept inert."""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siim_jax import cli
from siim_jax.config_utils import ConfigError, from_dict, load_config
from siim_jax.data.dicom import DicomError, read_dicom, read_header
from siim_jax.data.labels import LabelError, build_index, read_image_ids
from siim_jax.training import loop as train
from tests import dicom_factory as factory
from tests.bad_inputs import (
    BAD_ID,
    CORPUS,
    DICOM_CASES,
    EXPECTED_AREAS,
    IMAGE_IDS,
    ConfigCase,
    DicomCase,
    LabelCase,
    TreeCase,
    WorkdirCase,
    label_file,
    write_tree,
)
from tests.conftest import reference_import

DEMO_CONFIG = "demo"

# ---------------------------------------------------------------------------------------------------- the corpus


def check_dicom_case(case: DicomCase, tmp_path: Path) -> None:
    path = case.build(tmp_path)
    for reader, reason in ((read_header, case.header_error), (read_dicom, case.header_error or case.decode_error)):
        if reason is None:
            reader(path)
            continue
        with pytest.raises(DicomError, match=reason) as info:
            reader(path)
        assert info.value.path == str(path) and str(info.value).startswith(str(path))
    if case.check is not None:
        case.check(read_dicom(path))


def _areas(index) -> dict[str, int]:
    return dict(zip(index.frame["image_id"], index.frame["area"]))


def check_label_case(case: LabelCase, tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", [(image_id, "a") for image_id in IMAGE_IDS])
    labels = tmp_path / "labels.csv"
    if case.content is not None:
        labels.write_bytes(case.content)
    if case.error is None:
        for strict in (True, False):
            index = build_index(tree, labels, n_folds=2, strict=strict)
            assert _areas(index) == EXPECTED_AREAS and index.skipped.empty
        return
    with pytest.raises(LabelError, match=case.error) as info:
        build_index(tree, labels, n_folds=2, strict=True)
    assert str(labels) in str(info.value)
    if not case.row_level:
        with pytest.raises(LabelError, match=case.error):
            build_index(tree, labels, n_folds=2, strict=False)
        return
    assert f"ImageId {BAD_ID}" in str(info.value)
    lenient = build_index(tree, labels, n_folds=2, strict=False)
    assert _areas(lenient) == {k: v for k, v in EXPECTED_AREAS.items() if k != BAD_ID}
    (skipped,) = lenient.skipped.itertuples()
    assert (skipped.image_id, skipped.path) == (BAD_ID, str(labels))
    assert re.search(case.error, skipped.reason)
    assert BAD_ID not in lenient.images_without_labels


def check_tree_case(case: TreeCase, tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", case.files)
    labels = tmp_path / "labels.csv"
    labels.write_bytes(label_file(case.rows))
    if case.error is not None:
        with pytest.raises(LabelError, match=case.error):
            build_index(tree, labels, n_folds=2)
    else:
        case.check(build_index(tree, labels, n_folds=2))


def check_config_case(case: ConfigCase, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=case.error) as info:
        if case.values is not None:
            from_dict(case.values)
        elif case.overrides:
            load_config(DEMO_CONFIG, case.overrides)
        else:
            path = tmp_path / ("missing.py" if case.file_text is None else "config.py")
            if case.file_text is not None:
                path.write_text(case.file_text)
            load_config(str(path))
    assert case.names in str(info.value)


def small_challenge_tree(root: Path) -> Path:
    """A challenge tree of three small images with their labels."""
    write_tree(root / "dicom-images-train", [(image_id, "a") for image_id in IMAGE_IDS])
    (root / "train-rle.csv").write_bytes(label_file())
    return root


def check_workdir_case(case: WorkdirCase, tmp_path: Path) -> None:
    workdir = case.prepare(tmp_path)
    config = load_config(f"{DEMO_CONFIG}:{small_challenge_tree(tmp_path / 'data')}")
    with pytest.raises(OSError, match=case.error) as info:
        train.train_and_evaluate(config, workdir)
    assert str(workdir / case.names) in str(info.value)


CHECKS = {
    DicomCase: ("dicom", check_dicom_case),
    LabelCase: ("labels", check_label_case),
    TreeCase: ("tree", check_tree_case),
    ConfigCase: ("config", check_config_case),
    WorkdirCase: ("workdir", check_workdir_case),
}


def test_the_corpus_has_at_least_30_cases_with_distinct_names():
    names = [f"{CHECKS[type(case)][0]}/{case.name}" for case in CORPUS]
    assert len(names) >= 30 and len(set(names)) == len(names)


TRUNCATION_WARNING = "ignore:End of file reached before delimiter"  # pydicom's, on the files cut short


@pytest.mark.filterwarnings(TRUNCATION_WARNING)
@pytest.mark.parametrize("case", CORPUS, ids=lambda case: f"{CHECKS[type(case)][0]}/{case.name}")
def test_bad_input(case, tmp_path):
    if isinstance(case, WorkdirCase) and case.name == "full-disk" and not os.path.exists("/dev/full"):
        pytest.skip("needs Linux's /dev/full")
    CHECKS[type(case)][1](case, tmp_path)


# ---------------------------------------------------------------------------------------------------- training

# Every failing file of the corpus that can sit in a DICOM tree (a missing file cannot).
HEADER_FAILURES = [case for case in DICOM_CASES if case.header_error and case.name != "missing-file"]
DECODE_FAILURES = [case for case in DICOM_CASES if case.decode_error]
RUN_SETTINGS = [
    "--config.data.image_size=32",
    "--config.data.n_folds=3",
    "--config.data.balance.mode=none",
    "--config.train.batch_size=2",
    "--config.train.eval_batch_size=2",
    "--config.train.epochs=1",
    "--config.train.log_every_steps=1",
    "--config.train.eval_at_start=False",
    "--config.optim.warmup_steps=1",
]


def bad_image_id(case: DicomCase) -> str:
    return f"9.9.{case.name}"


@pytest.fixture(scope="module")
def tree_with_bad_inputs(synthetic_trees, tmp_path_factory) -> tuple[Path, str]:
    """8 synthetic images, every header and decode failure of the corpus as a labelled image, and a malformed
    label row for one of the synthetic images; returns the tree and that image's id."""
    root = tmp_path_factory.mktemp("bad_training") / "data"
    shutil.copytree(synthetic_trees(8, seed=2, positive_fraction=0.5), root)
    bad_folder = root / "dicom-images-train" / "bad"
    bad_folder.mkdir()
    for case in HEADER_FAILURES + DECODE_FAILURES:
        scratch = tmp_path_factory.mktemp(case.name)
        shutil.move(case.build(scratch), bad_folder / f"{bad_image_id(case)}.dcm")
    bad_label_id = read_image_ids(root / "train-rle.csv")[0]
    rows = [f"{bad_image_id(case)}, -1" for case in HEADER_FAILURES + DECODE_FAILURES] + [f"{bad_label_id}, 7 7 7"]
    with open(root / "train-rle.csv", "a") as labels:
        labels.write("".join(row + "\n" for row in rows))
    return root, bad_label_id


def run_training(root: Path, workdir: Path, *settings: str) -> int:
    return cli.main(["train", "--config", f"{DEMO_CONFIG}:{root}", "--workdir", str(workdir), *RUN_SETTINGS, *settings])


@pytest.mark.filterwarnings(TRUNCATION_WARNING)
def test_lenient_training_lists_every_bad_input_in_skipped_csv_and_finishes(tree_with_bad_inputs, tiny_model, tmp_path):
    root, bad_label_id = tree_with_bad_inputs
    assert run_training(root, tmp_path / "run") == 0  # every epoch ran to its end and was checkpointed
    skipped = pd.read_csv(tmp_path / "run" / train.SKIPPED_FILE, dtype=str).set_index("image_id")
    cases = HEADER_FAILURES + DECODE_FAILURES
    expected = {bad_image_id(case): case.header_error or case.decode_error for case in cases}
    expected[bad_label_id] = "odd number of values"
    assert sorted(skipped.index) == sorted(expected)
    for image_id, reason in expected.items():
        assert re.search(reason, skipped.loc[image_id, "reason"]), image_id
    assert skipped.loc[bad_label_id, "path"] == str(root / "train-rle.csv")
    for case in cases:
        assert skipped.loc[bad_image_id(case), "path"].endswith(f"{bad_image_id(case)}.dcm")
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_strict_training_stops_before_training_naming_the_file_and_reason(tree_with_bad_inputs, tmp_path, capsys):
    root, bad_label_id = tree_with_bad_inputs
    strict_root = tmp_path / "data"
    shutil.copytree(root, strict_root)
    assert run_training(strict_root, tmp_path / "run", "--config.data.strict=True") == 1
    message = capsys.readouterr().err
    assert f"{strict_root / 'train-rle.csv'}: RLE has an odd number of values (3) (ImageId {bad_label_id})" in message

    labels = strict_root / "train-rle.csv"
    labels.write_text("".join(line for line in labels.open() if bad_label_id not in line or "7 7 7" not in line))
    assert run_training(strict_root, tmp_path / "run", "--config.data.strict=True") == 1
    message = capsys.readouterr().err
    (named,) = [case for case in HEADER_FAILURES if f"{bad_image_id(case)}.dcm: " in message]
    assert re.search(named.header_error, message)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_disk_full_during_a_run_stops_it_naming_the_file(tree_with_bad_inputs, tiny_model, tmp_path, capsys):
    root, _ = tree_with_bad_inputs
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").symlink_to("/dev/full")  # the first metrics line hits a full disk
    assert run_training(root, workdir, "--config.train.eval_at_start=True") == 1  # written at step 0
    assert f"No space left on device: '{workdir / 'metrics.jsonl'}'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- untrusted input

hostile_ids = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["..", ".", "../../etc/passwd", "/etc/passwd", "a/../../b", "..\\..\\win", "~root", "\x00x"]),
)


@settings(max_examples=300, deadline=None)
@given(hostile_ids)
def test_image_ids_become_plain_file_names_inside_the_folder(image_id):
    from siim_jax.pictures import safe_file_name

    name = safe_file_name(image_id)
    folder = Path("/srv/overlays")
    assert "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
    assert (folder / name).parent == folder and len(name.encode()) < 256


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_overlays_of_hostile_dicom_ids_stay_in_their_folder(tmp_path):
    from siim_jax.inference.overlays import OverlayWriter

    out = tmp_path / "deep" / "overlays"
    writer = OverlayWriter(out)
    for index, uid in enumerate(["../../escaped", "/tmp/absolute", "..", "a/b/../../c"]):
        path = factory.save(factory.dataset(factory.ramp(), SOPInstanceUID=uid), tmp_path / f"{index}.dcm")
        image = read_dicom(path)
        assert image.image_id == uid  # the tag is read as it is ...
        writer.add(index, image.image_id, image.pixels, np.zeros_like(image.pixels, bool))
    writer.finish()
    written = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*.png"))
    assert written and all(path.parts[:2] == ("deep", "overlays") and len(path.parts) == 3 for path in written)


class _Payload:
    """Unpickling this runs `touch` on the canary file: what a hostile checkpoint would do."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


def test_pytorch_checkpoints_are_loaded_as_weights_only(tmp_path):
    torch = reference_import("torch")

    from siim_jax.models.convert import load_state_dict

    canary = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": _Payload(canary)}, hostile)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state_dict(hostile)
    assert not canary.exists()
    plain = tmp_path / "plain.pth"
    torch.save({"conv1.weight": torch.ones(2)}, plain)
    np.testing.assert_array_equal(load_state_dict(plain)["conv1.weight"], np.ones(2, np.float32))


@pytest.mark.parametrize("key", ["train.epochs", "model.encoder", "data.root"])
def test_config_overrides_are_data_never_code(tmp_path, key):
    canary = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {canary}')"
    try:
        config = load_config(DEMO_CONFIG, [f"--config.{key}={payload}"])
    except ConfigError as error:
        assert f"'{key}'" in str(error)  # a number field refuses the text
    else:
        node, name = key.split(".")
        assert config[node][name] == payload  # a text field keeps it as text
    assert not canary.exists()


@pytest.mark.parametrize("image_id", ["1.2,3", '1.2"3', "1.2\n3", "1.2\r3"])
def test_submissions_refuse_image_ids_that_would_break_a_csv_line(tmp_path, image_id):
    from siim_jax.inference.submission import SubmissionError, write_submission

    out = tmp_path / "submission.csv"
    with pytest.raises(SubmissionError, match="would break the CSV"):
        write_submission(out, [("1.2.4", "-1"), (image_id, "-1")])
    assert not any(tmp_path.iterdir())
