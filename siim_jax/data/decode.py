"""One DICOM and its run-length masks -> image and merged mask at the training size.

The one decoding path shared by the prepared cache (tfds_siim) and the on-the-fly source (pipeline), so both give
identical arrays. It needs no TensorFlow Datasets.
"""

import dataclasses

import numpy as np

from siim_jax.data import rle
from siim_jax.data.augment import resize_pair
from siim_jax.data.dicom import read_dicom


@dataclasses.dataclass(frozen=True)
class DecodedExample:
    image: np.ndarray  # uint8 (S, S)
    mask: np.ndarray  # uint8 (S, S) in {0, 1}
    original_size: tuple[int, int]  # (height, width)


def decode_example(path, rles, image_size: int) -> DecodedExample:
    """Decodes one DICOM and its merged mask at full size and resizes both to `image_size`."""
    dicom = read_dicom(path)
    mask = rle.decode_merged(rles, *dicom.original_size, image_id=dicom.image_id).view(np.uint8)
    image, mask = resize_pair(dicom.pixels, mask, image_size)
    return DecodedExample(image, mask, dicom.original_size)
