"""Run-length codecs for the challenge's masks.

Pixels are numbered down each column, then left to right (column-major, 0-based). The challenge's *relative*
encoding lists ``start length`` pairs where the first start is absolute and every later start is the gap after
the end of the previous run. The *standard* (absolute) encoding lists 1-based absolute starts. ``-1`` marks an
empty mask in both. Decoding ORs overlapping runs, so several rows of one image can be merged by decoding each.
"""

from __future__ import annotations

import numpy as np

EMPTY = "-1"


class RLEError(ValueError):
    """A malformed run-length string; the message names the image when it is known."""


def _where(image_id: str | None) -> str:
    return f" (ImageId {image_id})" if image_id else ""


def _parse_pairs(rle: str, image_id: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Splits an RLE string into (starts-or-gaps, lengths) as int64 arrays; ``-1``/blank give empty arrays."""
    where = _where(image_id)
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string, got {type(rle).__name__}{where}")
    text = rle.strip()
    if text in ("", EMPTY):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tokens = text.split()
    try:
        values = np.array([int(token) for token in tokens], dtype=np.int64)
    except ValueError:
        bad = next(t for t in tokens if not t.lstrip("-").isdigit())
        raise RLEError(f"non-numeric RLE value {bad!r}{where}") from None
    if values.size % 2:
        raise RLEError(f"RLE has an odd number of values ({values.size}){where}")
    if (values < 0).any():
        raise RLEError(f"negative RLE value {int(values[values < 0][0])}{where}")
    return values[0::2], values[1::2]


def _paint(starts: np.ndarray, lengths: np.ndarray, height: int, width: int, image_id: str | None) -> np.ndarray:
    """Paints absolute 0-based column-major runs into a bool (height, width) mask, OR-ing overlaps."""
    size = height * width
    ends = starts + lengths
    if ends.size and ends.max() > size:
        raise RLEError(f"RLE run ends at pixel {int(ends.max())}, past the {height}x{width} image{_where(image_id)}")
    flat = np.zeros(size, bool)
    # Indices of every covered pixel: one arange per run, built as a single vector (cost ~ mask area).
    offsets = np.cumsum(lengths) - lengths
    flat[np.arange(int(lengths.sum())) + np.repeat(starts - offsets, lengths)] = True
    return flat.reshape(width, height).T  # Fortran-ordered: a column-major view, no transpose copy


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absolute 0-based column-major (starts, ends) of the runs of True in a 2-D mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RLEError(f"mask must be 2-D, got shape {mask.shape}")
    flat = mask.astype(bool, copy=False).T.ravel()
    if not flat.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        edges = np.concatenate([[0], edges])
    if flat[-1]:
        edges = np.concatenate([edges, [flat.size]])
    return edges[0::2], edges[1::2]


def _join(first: np.ndarray, second: np.ndarray) -> str:
    if first.size == 0:
        return EMPTY
    return " ".join(map(str, np.stack([first, second], axis=1).ravel().tolist()))


def relative_runs(rle: str, image_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Absolute 0-based column-major (starts, ends) of the runs of a relative RLE string."""
    gaps, lengths = _parse_pairs(rle, image_id)
    ends = np.cumsum(gaps + lengths)
    return ends - lengths, ends


def decode(rle: str, height: int = 1024, width: int = 1024, image_id: str | None = None) -> np.ndarray:
    """Decodes the challenge's relative RLE into a bool (height, width) mask."""
    starts, ends = relative_runs(rle, image_id)
    return _paint(starts, ends - starts, height, width, image_id)


def encode(mask: np.ndarray) -> str:
    """Encodes a 2-D mask in the challenge's relative RLE (``-1`` when empty)."""
    starts, ends = _runs(mask)
    gaps = starts - np.concatenate([[0], ends[:-1]])
    return _join(gaps, ends - starts)


def decode_standard(rle: str, height: int = 1024, width: int = 1024, image_id: str | None = None) -> np.ndarray:
    """Decodes standard RLE (1-based absolute starts, column-major) into a bool (height, width) mask."""
    starts, lengths = _parse_pairs(rle, image_id)
    if (starts == 0).any():
        raise RLEError(f"standard RLE starts are 1-based, found a 0{_where(image_id)}")
    return _paint(starts - 1, lengths, height, width, image_id)


def encode_standard(mask: np.ndarray) -> str:
    """Encodes a 2-D mask in standard RLE (1-based absolute starts, ``-1`` when empty)."""
    starts, ends = _runs(mask)
    return _join(starts + 1, ends - starts)


def decode_merged(rles, height: int = 1024, width: int = 1024, image_id: str | None = None) -> np.ndarray:
    """ORs the masks of several relative-RLE rows of one image."""
    mask = np.zeros((height, width), bool)
    for rle in rles:
        mask |= decode(rle, height, width, image_id)
    return mask
