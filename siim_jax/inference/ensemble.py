"""Several models as one: members run one after another and their probabilities are averaged per image.

    siim-jax predict --checkpoint RUN_A --checkpoint RUN_B ...        (each with the shared --step/--best/...)
    siim-jax predict --ensemble ensemble.json ...

An ensemble file lists its members; every key but `path` is optional (relative paths are read from the file's
folder):

    {"members": [
        {"path": "runs/winner1024", "weight": 2, "average_top": 3, "image_size": 1024},
        {"path": "runs/seresnext50", "best": true, "image_size": 512, "tta": false}
    ]}

Members may differ in architecture and input size. Each member's probabilities are resized to each image's
original size and added there, weighted, to a float32 sum kept in memory-mapped files in a temporary folder (4 bytes
per original pixel and image: 4 MiB per 1024² image), so that only one member is ever loaded; the class
probabilities of the members with a class head are averaged with the same weights. An ensemble of one run with
itself gives exactly that run's probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections
import numpy as np

from siim_jax.inference.predictor import Inference, Item, Prediction, UnreadableImageWarning

MEMBER_KEYS = ("path", "weight", "step", "best", "average_top", "average_last", "image_size", "tta")


class EnsembleFileError(ValueError):
    """An ensemble file that cannot be read, naming the file and the reason."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of an ensemble: a training run (or converted model directory) and how to predict with it."""

    path: Path
    weight: float = 1.0
    step: int | None = None
    best: bool = False
    average_top: int = 0
    average_last: int = 0
    image_size: int | None = None  # default: the run's config.data.image_size
    tta: bool = True

    @property
    def selection(self) -> dict:
        """Which checkpoints of the run: restore_for_inference's keyword arguments."""
        return {"step": self.step, "best": self.best, "average_top": self.average_top,
                "average_last": self.average_last}


def read_ensemble_file(path: str | Path) -> list[Member]:
    """The members listed in an ensemble JSON file (see the module docstring)."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())["members"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise EnsembleFileError(f"{path}: not an ensemble file with a 'members' list ({error!r})") from error
    if not isinstance(entries, list) or not entries:
        raise EnsembleFileError(f"{path}: 'members' must be a non-empty list")
    members = []
    for number, entry in enumerate(entries):
        unknown = set(entry) - set(MEMBER_KEYS) if isinstance(entry, dict) else None
        if unknown is None or "path" not in entry or unknown:
            raise EnsembleFileError(
                f"{path}: member {number} must be an object with a 'path' and only keys of {MEMBER_KEYS}; "
                f"got {entry!r}"
            )
        member = Member(**{**entry, "path": path.parent / entry["path"]})
        if not member.weight > 0:
            raise EnsembleFileError(f"{path}: member {number} has weight {member.weight}; weights must be positive")
        members.append(member)
    return members


class _ProbabilitySums:
    """Per-image weighted sums of probabilities at the original size, in float32 `.npy` files memory-mapped one
    at a time, so that host memory holds one image's sum whatever the number of images."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.sizes: dict[int, tuple[int, int]] = {}

    def _file(self, index: int) -> Path:
        return self.folder / f"{index}.npy"

    def add(self, index: int, prob: np.ndarray, weight: float) -> None:
        weighted = prob if weight == 1.0 else np.float32(weight) * prob
        if index not in self.sizes:
            self.sizes[index] = prob.shape
            np.save(self._file(index), weighted.astype(np.float32))
            return
        if prob.shape != self.sizes[index]:
            raise ValueError(f"image {index}: probabilities of shape {prob.shape}, earlier {self.sizes[index]}")
        total = np.load(self._file(index), mmap_mode="r+")
        total += weighted
        total.flush()

    def mean(self, index: int, total_weight: float) -> np.ndarray:
        return np.load(self._file(index)) / np.float32(total_weight)


@dataclasses.dataclass
class Ensemble:
    """Members loaded one at a time, each with `Inference.from_checkpoint`, offering `Inference.predictions`.

    `on_error` and unreadable-image warnings apply once, with the first member; `config` is the first member's.
    """

    members: Sequence[Member]
    batch_size: int = 8
    workers: int | str = 0
    on_error: str = "empty"
    progress: bool = True
    dtype: str | None = None  # compute dtype of every member (None: each checkpoint's own)

    def __post_init__(self):
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        self._config: ml_collections.ConfigDict | None = None

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The first member's config (read from its checkpoint, without loading its weights on the devices)."""
        if self._config is None:
            from siim_jax.training.checkpoints import restore_config

            first = self.members[0]
            self._config = restore_config(first.path, **first.selection)
        return self._config

    @property
    def image_size(self) -> int:
        """The largest member input size: where `tune` scores the ensemble's probabilities."""
        return max(self._image_size(member) for member in self.members)

    def _image_size(self, member: Member) -> int:
        if member.image_size is not None:
            return member.image_size
        from siim_jax.training.checkpoints import restore_config

        config = restore_config(member.path, **member.selection)
        if "data" not in config:
            raise ValueError(f"{member.path} holds no data config: give the member's image_size")
        return int(config.data.image_size)

    def _inference(self, member: Member, first: bool) -> Inference:
        return Inference.from_checkpoint(
            member.path, **member.selection, image_size=member.image_size, batch_size=self.batch_size,
            tta=member.tta, workers=self.workers, on_error=self.on_error if first else "empty",
            progress=self.progress, dtype=self.dtype,
        )

    def predictions(self, items: Sequence[Item], desc: str = "predict") -> Iterator[Prediction]:
        """The weighted mean predictions of the items, in order, at each image's original size, after every
        member has run (each under its own progress bar)."""
        total_weight = float(sum(member.weight for member in self.members))
        class_sums: dict[int, list[float]] = {}  # index -> [weighted sum, weight of the members with a class head]
        unreadable: dict[int, Prediction] = {}
        with tempfile.TemporaryDirectory(prefix="siim-jax-ensemble-") as folder:
            sums = _ProbabilitySums(Path(folder))
            for number, member in enumerate(self.members):
                inference = self._inference(member, first=number == 0)
                label = f"{desc}: member {number + 1}/{len(self.members)}"
                with warnings.catch_warnings():
                    if number > 0:  # the first member has already reported them
                        warnings.simplefilter("ignore", UnreadableImageWarning)
                    for prediction in inference.predictions(items, desc=label):
                        if prediction.prob is None:
                            unreadable[prediction.index] = prediction
                            continue
                        sums.add(prediction.index, prediction.prob_at_original_size(), member.weight)
                        if prediction.class_prob is not None:
                            weighted = class_sums.setdefault(prediction.index, [0.0, 0.0])
                            weighted[0] += member.weight * prediction.class_prob
                            weighted[1] += member.weight
                del inference  # frees the member's weights before the next one loads
            for index, (image_id, path) in enumerate(items):
                if index in unreadable or index not in sums.sizes:
                    yield unreadable.get(index) or Prediction(index, image_id, path, None, None, None)
                    continue
                class_sum = class_sums.get(index)
                class_prob = None if class_sum is None else class_sum[0] / class_sum[1]
                yield Prediction(index, image_id, path, sums.mean(index, total_weight), class_prob, sums.sizes[index])


def load_inference(
    checkpoints: Sequence[str | Path] = (),
    ensemble_file: str | Path | None = None,
    *,
    step: int | None = None,
    best: bool = False,
    average_top: int = 0,
    average_last: int = 0,
    image_size: int | None = None,
    batch_size: int = 8,
    tta: bool = True,
    workers: int | str = 0,
    on_error: str = "empty",
    dtype: str | None = None,
) -> Inference | Ensemble:
    """One checkpoint's `Inference`, or an `Ensemble` of several checkpoints (each with these options) or of an
    ensemble file's members; either offers `.predictions(items)`, `.batch_size` and `.config`."""
    if bool(checkpoints) == (ensemble_file is not None):
        raise ValueError("give checkpoints (one, or several for an ensemble) or an ensemble file, not both")
    selection = {"step": step, "best": best, "average_top": average_top, "average_last": average_last}
    if len(checkpoints) == 1:
        return Inference.from_checkpoint(
            checkpoints[0], **selection, image_size=image_size,
            batch_size=batch_size, tta=tta, workers=workers, on_error=on_error, dtype=dtype,
        )
    if ensemble_file is not None:
        members = read_ensemble_file(ensemble_file)
    else:
        members = [Member(Path(path), **selection, image_size=image_size, tta=tta) for path in checkpoints]
    return Ensemble(members, batch_size, workers, on_error, dtype=dtype)
