"""The challenge's folder and file names, defined once.

A challenge tree (real, or written by ``siim-jax synth``) looks like::

    ROOT/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm
    ROOT/dicom-images-test/...            (same layout)
    ROOT/train-rle.csv                    stage-1 labels
    ROOT/stage_2_train.csv                stage-2 labels (train and test)
    ROOT/sample_submission.csv            the test ImageIds
"""

TRAIN_DIR = "dicom-images-train"
TEST_DIR = "dicom-images-test"
SPLIT_DIRS = {"train": TRAIN_DIR, "test": TEST_DIR}
DICOM_SUFFIX = ".dcm"

TRAIN_CSV = "train-rle.csv"
STAGE2_CSV = "stage_2_train.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
