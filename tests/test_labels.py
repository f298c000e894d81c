import numpy as np
import pandas as pd
import pytest

from siim_jax.data import labels, rle

from . import dicom_factory as factory
from .conftest import REAL_LABELS


@pytest.fixture(scope="module")
def real_labels(siim_real):
    return labels.read_labels(REAL_LABELS)


def test_full_label_file_counts(real_labels):
    table = labels.per_image(real_labels)
    assert len(real_labels) == 12954
    assert len(table) == 12047
    assert int(table["positive"].sum()) == 2669
    assert int(table["rles"].map(len).sum()) == 3576
    assert int(table["n_rows"].max()) == 10


def test_merged_area_equals_decoded_or(real_labels):
    table = labels.per_image(real_labels)
    multi = table[table["rles"].map(len) > 1].head(40)
    for _, row in multi.iterrows():
        assert row["area"] == labels.merged_mask(row).sum()


def test_stage1_format_with_bom_and_crlf(real_labels, siim_real, tmp_path):
    stage1_test = set(labels.read_image_ids(siim_real / "new_sample_submission.csv"))
    stage1 = real_labels[~real_labels["ImageId"].isin(stage1_test)]
    path = tmp_path / "train-rle.csv"
    lines = ["ImageId, EncodedPixels"] + [f"{i}, {e}" for i, e in zip(stage1["ImageId"], stage1["EncodedPixels"])]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    reread = labels.read_labels(path)
    assert len(reread) == 11582
    table = labels.per_image(reread)
    assert (len(table), int(table["positive"].sum())) == (10675, 2379)
    pd.testing.assert_frame_equal(reread.reset_index(drop=True), stage1.reset_index(drop=True))


def test_sample_image_labels_header_variant(siim_real):
    frame = labels.read_labels(siim_real / "train-rle-sample.csv")
    table = labels.per_image(frame)
    assert len(table) == 10 and int(table["positive"].sum()) == 5
    assert not frame["EncodedPixels"].str.startswith(" ").any()


def test_sample_submissions(siim_real):
    assert len(labels.read_image_ids(siim_real / "stage_2_sample_submission.csv")) == 3205
    assert len(labels.read_labels(siim_real / "new_sample_submission.csv")) == 1484
    assert len(labels.read_image_ids(siim_real / "new_sample_submission.csv")) == 1372


# Bad label files (wrong columns, empty ImageId, zero bytes, malformed RLE naming the image, ...) are cases of the
# corpus in tests/bad_inputs.py, which test_reliability_inputs.py checks through build_index.


TREE_SHAPE = (64, 96)  # (Rows, Columns) of the files `_tree` writes


def _tree(tmp_path, ids_and_patients):
    root = tmp_path / "dicom-images-train"
    for image_id, patient in ids_and_patients:
        folder = root / f"study-{image_id}" / "series"
        folder.mkdir(parents=True)
        ds = factory.dataset(np.zeros(TREE_SHAPE, np.uint8), SOPInstanceUID=image_id, PatientID=patient)
        factory.save(ds, folder / f"{image_id}.dcm")
    return root


def test_index_joins_tree_and_labels_and_reports_mismatches(tmp_path):
    ids = [(f"1.2.3.{i}", f"p{i // 2}") for i in range(12)]
    root = _tree(tmp_path, ids)
    mask = np.zeros(TREE_SHAPE, bool)
    mask[10:20, 20:60] = True
    first, second = mask.copy(), mask.copy()
    second[15:30, 50:80] = True
    rows = [("1.2.3.0", rle.encode(first)), ("1.2.3.0", rle.encode(second)), ("1.2.3.1", "-1")]
    rows += [(f"1.2.3.{i}", rle.encode(mask) if i % 3 == 0 else "-1") for i in range(2, 11)]
    rows += [("9.9.9", "-1")]
    csv = tmp_path / "train-rle.csv"
    csv.write_text("ImageId, EncodedPixels\n" + "".join(f"{i}, {e}\n" for i, e in rows))
    index = labels.build_index(root, csv, n_folds=3, seed=1)
    frame = index.frame.set_index("image_id")
    assert len(frame) == 11
    assert index.images_without_labels == ["1.2.3.11"]
    assert index.labels_without_images == ["9.9.9"]
    merged = labels.merged_mask(frame.loc["1.2.3.0"].to_dict() | {"image_id": "1.2.3.0"}, TREE_SHAPE)
    np.testing.assert_array_equal(merged, first | second)
    assert frame.loc["1.2.3.0", "area"] == (first | second).sum()
    assert frame.loc["1.2.3.0", "path"].endswith("1.2.3.0.dcm")
    patients = frame.groupby("patient_id")["fold"].nunique()
    assert (patients == 1).all()  # one patient never spans two folds
    assert set(frame["fold"]) == {0, 1, 2}
    again = labels.build_index(root, csv, n_folds=3, seed=1)
    np.testing.assert_array_equal(again.frame["fold"], index.frame["fold"])


def test_folds_are_stratified():
    positive = np.array([True] * 50 + [False] * 150)
    folds = labels.assign_folds(positive, np.arange(200), n_folds=5, seed=0)
    counts = pd.crosstab(folds, positive)
    assert (counts[True] == 10).all() and (counts[False] == 30).all()


def test_test_set_index_without_labels(tmp_path):
    root = _tree(tmp_path, [("1.5.1", "a"), ("1.5.2", "b")])
    index = labels.build_index(root)
    assert sorted(index.frame["image_id"]) == ["1.5.1", "1.5.2"]
    assert (index.frame["fold"] == -1).all()


def test_duplicate_image_ids_are_an_error(tmp_path):
    root = _tree(tmp_path, [("1.6.1", "a")])
    copy = root / "other" / "1.6.1.dcm"
    copy.parent.mkdir()
    copy.write_bytes(next(root.rglob("*.dcm")).read_bytes())
    with pytest.raises(labels.LabelError, match="duplicate ImageId 1.6.1"):
        labels.find_dicoms(root)


def test_synthetic_dataset_round_trips_through_the_index(tmp_path):
    from siim_jax.data import synthetic

    seed = 11
    summary = synthetic.generate(tmp_path / "synth", n_train=6, n_test=2, seed=seed, progress=False)
    index = labels.build_index(summary.out_dir / "dicom-images-train", summary.train_csv, n_folds=2)
    assert not index.images_without_labels and not index.labels_without_images
    frame = index.frame.set_index("image_id")
    assert sorted(frame.index) == sorted(summary.train_ids)
    for position, image_id in enumerate(summary.train_ids):
        case = synthetic.synthesize_case(seed, "train", position)
        row = frame.loc[image_id].to_dict() | {"image_id": image_id}
        np.testing.assert_array_equal(labels.merged_mask(row), case.mask)
        assert row["positive"] == bool(case.mask.any()) and row["area"] == case.mask.sum()
    test_index = labels.build_index(summary.out_dir / "dicom-images-test")
    assert sorted(test_index.frame["image_id"]) == sorted(summary.test_ids)


def test_runs_are_checked_against_each_images_own_rows_and_columns(tmp_path):
    # A run past pixel 1024² fits a 1100x1000 radiograph; a run past 32x48 does not fit that small one.
    big, small = ("1.7.1", (1100, 1000)), ("1.7.2", (32, 48))
    root = tmp_path / "tree"
    for image_id, shape in (big, small):
        (root / image_id).mkdir(parents=True)
        ds = factory.dataset(np.zeros(shape, np.uint8), SOPInstanceUID=image_id)
        factory.save(ds, root / image_id / f"{image_id}.dcm")
    csv = tmp_path / "labels.csv"
    csv.write_text(f"ImageId,EncodedPixels\n{big[0]},1050000 100\n{small[0]},1530 10\n")
    index = labels.build_index(root, csv, n_folds=2, strict=False)
    assert list(index.frame["image_id"]) == [big[0]] and list(index.frame["area"]) == [100]
    (skipped,) = index.skipped.itertuples()
    assert skipped.image_id == small[0] and "past the 32x48 image" in skipped.reason
    with pytest.raises(labels.LabelError, match=f"past the 32x48 image \\(ImageId {small[0]}\\)"):
        labels.build_index(root, csv, n_folds=2)
