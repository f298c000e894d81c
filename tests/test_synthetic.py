"""The synthetic dataset: the challenge's layout and formats, labels that match the rendered masks, determinism,
and a measurable pneumothorax (darker and less textured than the lung beside it)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from siim_jax.commands import synth
from siim_jax.data import layout, rle, synthetic
from siim_jax.data.synthetic import anatomy, patients

SEED = 3
N_TRAIN, N_TEST = 6, 2


def generate(out: Path, **options) -> synthetic.SyntheticSummary:
    options = {"n_train": 3, "n_test": 1, "seed": SEED, "progress": False} | options
    return synthetic.generate(out, **options)


def dicom_files(root: Path, split: str) -> list[Path]:
    return sorted((root / layout.SPLIT_DIRS[split]).glob("*/*/*.dcm"))


def file_digests(root: Path) -> dict[str, str]:
    files = (path for path in root.rglob("*") if path.is_file())
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def labels(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, skipinitialspace=True, dtype=str)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> synthetic.SyntheticSummary:
    return generate(tmp_path_factory.mktemp("synth") / "out", n_train=N_TRAIN, n_test=N_TEST, stage2=True)


def test_tree_has_the_challenge_layout(dataset):
    for split, ids in (("train", dataset.train_ids), ("test", dataset.test_ids)):
        files = dicom_files(dataset.out_dir, split)
        assert sorted(p.stem for p in files) == sorted(ids)
        assert len(set(p.parent.parent for p in files)) == len(files)  # one study and one series per image
    names = {p.name for p in dataset.out_dir.iterdir()}
    assert names == {"dicom-images-train", "dicom-images-test", "train-rle.csv", "sample_submission.csv",
                     "stage_2_train.csv"}


def test_dicom_files_read_like_the_real_ones(dataset):
    for path in dicom_files(dataset.out_dir, "train") + dicom_files(dataset.out_dir, "test"):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert ds.SOPClassUID == SecondaryCaptureImageStorage and ds.Modality == "CR"
        assert ds.SOPInstanceUID == path.stem == ds.file_meta.MediaStorageSOPInstanceUID
        assert (path.parent.name, path.parent.parent.name) == (ds.SeriesInstanceUID, ds.StudyInstanceUID)
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BodyPartExamined == "CHEST"
        assert ds.ViewPosition in ("PA", "AP") and ds.PatientSex in ("M", "F")
        assert len(list(generate_fragments(ds.PixelData))) == 2  # empty offset table + one JPEG fragment
        assert parse_basic_offsets(ds.PixelData) == []
        pixels = ds.pixel_array
        assert pixels.shape == (1024, 1024) and pixels.dtype == np.uint8


def test_metadata_has_every_element_of_the_real_file(dataset, siim_real):
    real = pydicom.dcmread(siim_real / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
    ours = pydicom.dcmread(dicom_files(dataset.out_dir, "train")[0])
    assert {e.keyword for e in real} <= {e.keyword for e in ours}
    assert {e.keyword for e in real.file_meta} <= {e.keyword for e in ours.file_meta}


def test_pixels_are_the_rendered_image_after_jpeg(dataset):
    path = dicom_files(dataset.out_dir, "train")[0]
    index = dataset.train_ids.index(path.stem)
    rendered = synthetic.synthesize_case(SEED, "train", index).image
    difference = np.abs(pydicom.dcmread(path).pixel_array.astype(int) - rendered)
    assert difference.mean() < 2.0


def test_train_csv_masks_equal_the_rendered_masks(dataset):
    lines = dataset.train_csv.read_text().splitlines()
    assert lines[0] == "ImageId, EncodedPixels" and all(", " in line for line in lines[1:])
    frame = labels(dataset.train_csv)
    assert list(frame.columns) == ["ImageId", "EncodedPixels"]
    assert set(frame.ImageId) == set(dataset.train_ids)
    assert dataset.train_positives >= 1
    for index, image_id in enumerate(dataset.train_ids):
        case = synthetic.synthesize_case(SEED, "train", index)
        assert case.identity.image_id == image_id
        rows = frame.EncodedPixels[frame.ImageId == image_id].tolist()
        np.testing.assert_array_equal(rle.decode_merged(rows), case.mask)
        assert (rows == [rle.EMPTY]) == (not case.mask.any())


def test_stage2_labels_and_sample_submission(dataset):
    stage2 = dataset.stage2_csv.read_text().splitlines()
    assert stage2[0] == "ImageId,EncodedPixels" and not any(" ," in line or ", " in line for line in stage2)
    stage2_ids = set(labels(dataset.stage2_csv).ImageId)
    assert stage2_ids == set(dataset.train_ids) | set(dataset.test_ids)
    submission = labels(dataset.sample_submission_csv)
    assert list(submission.ImageId) == list(dataset.test_ids)
    assert (submission.EncodedPixels == rle.EMPTY).all()


@pytest.mark.parametrize("fraction", [0.0, 0.22, 0.3, 1.0])
def test_positive_fraction_is_exact_up_to_one_case(fraction):
    for seed in range(5):
        for n in (7, 50):
            count = sum(synthetic.is_positive(seed, "train", index, fraction) for index in range(n))
            assert abs(count - n * fraction) < 1


def test_same_seed_gives_the_same_bytes_in_any_process_count(tmp_path):
    one = generate(tmp_path / "one")
    two = generate(tmp_path / "two", processes=2)
    other = generate(tmp_path / "other", seed=SEED + 1)
    assert file_digests(one.out_dir) == file_digests(two.out_dir)
    assert not set(one.train_ids) & set(other.train_ids)
    first_images = [sorted(file_digests(s.out_dir / "dicom-images-train").values()) for s in (one, other)]
    assert not set(first_images[0]) & set(first_images[1])


def test_generate_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate(tmp_path)


def rendered_with_lung(seed: int, difficulty: float = synthetic.DEFAULT_DIFFICULTY):
    """A positive case and the lung field of its anatomy (render_case draws the patient, then the anatomy)."""
    image, mask = synthetic.render_case(np.random.default_rng(seed), True, difficulty)
    rng = np.random.default_rng(seed)
    body = anatomy.sample_anatomy(rng, patients.sample_patient(rng))
    return image, mask, anatomy.lung_mask(anatomy.evaluate_fields(body))


def disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def region_and_neighbouring_lung(mask: np.ndarray, lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pneumothorax's interior and a band of the same lung 8..40 px beyond it, both off its edges and 25 px
    clear of the lung field's border (where the chest wall's shading would dominate)."""
    mask_u8 = mask.astype(np.uint8)
    _, lungs = cv2.connectedComponents((lung & ~mask).astype(np.uint8))
    near = cv2.dilate(mask_u8, disk(40)).astype(bool) & ~cv2.dilate(mask_u8, disk(8)).astype(bool)
    same_lung = lungs == np.bincount(lungs[near & (lungs > 0)]).argmax()
    core = cv2.erode(lung.astype(np.uint8), disk(25)).astype(bool)
    return cv2.erode(mask_u8, disk(8)).astype(bool) & core, near & same_lung & core


def marking_texture(image: np.ndarray) -> np.ndarray:
    """Bright structures narrower than ~12 px (the vessel markings): the white top-hat of the image smoothed
    past its quantum noise. A plain local std would mostly measure the ribs, which cross the region too."""
    smooth = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 2)
    return cv2.morphologyEx(smooth, cv2.MORPH_TOPHAT, disk(6))


@pytest.mark.parametrize("seed", range(4))
def test_pneumothorax_is_darker_and_less_textured_than_the_lung_beside_it(seed):
    image, mask, lung = rendered_with_lung(seed)
    inside, beside = region_and_neighbouring_lung(mask, lung)
    assert inside.sum() > 500 and beside.sum() > 500
    assert image[inside].mean() < image[beside].mean() - 10
    texture = marking_texture(image)
    assert texture[inside].mean() < 0.75 * texture[beside].mean()


def test_difficulty_controls_the_darkening_not_the_mask():
    easy, easy_mask, _ = rendered_with_lung(0, difficulty=0.0)
    hard, hard_mask, _ = rendered_with_lung(0, difficulty=1.0)
    np.testing.assert_array_equal(easy_mask, hard_mask)
    assert easy[easy_mask].mean() < hard[hard_mask].mean() - 5
    with pytest.raises(ValueError):
        synthetic.render_case(0, True, difficulty=1.5)


def test_mask_source_rows_come_from_the_real_label_file(tmp_path, siim_real):
    real = labels(siim_real / "siim-pneumothorax-train-rle.csv.gz")
    rows = real[real.EncodedPixels != rle.EMPTY].drop_duplicates("ImageId").head(3)
    source = tmp_path / "three.csv"
    lines = [f"{image_id}, {encoded}\n" for image_id, encoded in zip(rows.ImageId, rows.EncodedPixels)]
    source.write_text("ImageId, EncodedPixels\n" + "".join(lines))

    summary = generate(tmp_path / "out", n_train=4, n_test=0, positive_fraction=0.5, mask_source=source)
    written = labels(summary.train_csv)
    positive_rows = written.EncodedPixels[written.EncodedPixels != rle.EMPTY]
    assert summary.train_positives == 2
    assert set(positive_rows) <= set(rows.EncodedPixels)


def test_command_line_writes_a_dataset(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "cli"), "--n-train", "2", "--n-test", "1", "--seed", "5"])
    assert (args.difficulty, args.processes, args.stage2, args.mask_source) == (0.5, 1, False, None)
    assert synth.run(args) == 0
    assert len(dicom_files(tmp_path / "cli", "train")) == 2
    assert "images/s" in capsys.readouterr().out


SHAPES = ((96, 160), (160, 96))  # (Rows, Columns): wide and tall


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory) -> synthetic.SyntheticSummary:
    return generate(tmp_path_factory.mktemp("shapes") / "out", n_train=4, n_test=1, positive_fraction=1.0,
                    shapes=SHAPES)


def _centroid(mask: np.ndarray) -> np.ndarray:
    """(row, column) centre of mass as fractions of the height and width."""
    rows, columns = np.nonzero(mask)
    return np.array([rows.mean() / mask.shape[0], columns.mean() / mask.shape[1]])


def test_shapes_give_dicoms_of_those_rows_and_columns_with_labels_at_their_size(mixed_shapes):
    frame = labels(mixed_shapes.train_csv)
    for index, image_id in enumerate(mixed_shapes.train_ids):
        shape = SHAPES[index % len(SHAPES)]
        (path,) = (mixed_shapes.out_dir / "dicom-images-train").glob(f"*/*/{image_id}.dcm")
        ds = pydicom.dcmread(path)
        assert (ds.Rows, ds.Columns) == shape and ds.pixel_array.shape == shape
        square = synthetic.synthesize_case(SEED, "train", index, 1.0)  # the same case rendered at 1024²
        spacing = float(square.patient.pixel_spacing)
        np.testing.assert_allclose(np.multiply(ds.PixelSpacing, shape), 1024 * spacing, rtol=1e-5)  # same body, mm
        mask = rle.decode_merged(frame.EncodedPixels[frame.ImageId == image_id].tolist(), *shape)
        assert mask.any()
        # The region sits where it sits at 1024², as fractions of height and width: a transposed or (w, h)-swapped
        # resize moves it by 1.6% to 58% (measured); nearest resizing moves it by at most 0.14%.
        np.testing.assert_allclose(_centroid(mask), _centroid(square.mask), atol=0.01)
        resized = cv2.resize(pydicom.dcmread(path).pixel_array, (1024, 1024), interpolation=cv2.INTER_LINEAR)
        # the rendering stretched, after JPEG: 2.0-2.9 grey levels measured; transposed, 70-84
        assert np.abs(resized.astype(int) - square.image).mean() < 6


def test_shape_options_of_the_command_line(tmp_path):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "a"), "--shapes", "96x160,160X96"])
    assert args.shapes == [(96, 160), (160, 96)] and args.shape is None
    assert parser.parse_args([str(tmp_path / "b"), "--shape", "100", "120"]).shape == [100, 120]
    for bad in (["--shapes", "96x"], ["--shapes", "0x5"], ["--shape", "1", "2", "--shapes", "3x4"]):
        with pytest.raises(SystemExit):
            parser.parse_args([str(tmp_path / "c"), *bad])
    with pytest.raises(ValueError, match="both positive"):
        generate(tmp_path / "d", shapes=[(0, 5)])
