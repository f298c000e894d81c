"""Exported models: the forward pass of `predict`, run without the training code.

    siim-jax export --checkpoint RUN [--step N | --best | --average-top K] [--image-size S] --format onnx OUT.onnx
    siim-jax export --checkpoint RUN --format stablehlo OUT.stablehlo

Both forms take what a deployment has at hand: uint8 grey images (batch, S, S) already resized to the model's
size S (bilinear, as `predict` resizes), in batches of any size. The ImageNet normalisation and grey-to-RGB
replication are inside, by the lookup `predict` applies (`augment.model_input`). They return sigmoid
probabilities without test-time augmentation, computed in float32: the mask's (batch, S, S) and, for a model
with a classification head, the class's (batch,).

- onnx: converted by jax2onnx (the `export` extra); input `image`, outputs `mask_probability` and
  `class_probability`, and metadata naming the model, the input and the outputs.
- stablehlo: a serialized `jax.export.Exported` for CPU and CUDA, which
  `jax.export.deserialize(data).call(images)` runs with JAX alone.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from siim_jax.files import durable_file
from siim_jax.inference.predictor import checkpoint_image_size, predict_probabilities, with_compute_dtype

FORMATS = ("onnx", "stablehlo")
INPUT_NAME = "image"
OUTPUT_NAMES = ("mask_probability", "class_probability")
BATCH = "batch"  # the symbolic batch dimension
PLATFORMS = ("cpu", "cuda")  # what a StableHLO artifact can run on
INSTALL_EXTRA = "pip install 'siim-jax[export]'"
INPUT_DESCRIPTION = (
    "uint8 grey radiographs (batch, {size}, {size}), resized bilinearly to the model's size; "
    "ImageNet normalisation and grey-to-RGB are inside the graph"
)
OUTPUT_DESCRIPTION = "sigmoid probabilities without test-time augmentation, float32: {names}"


class MissingExtraError(ImportError):
    """ONNX export without the packages of the `export` extra."""


def forward(model: nnx.Module) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """uint8 grey (batch, S, S) -> (mask probabilities,), or (mask, class probabilities) for a model with a
    classification head: `predict`'s forward pass with test-time augmentation off."""

    def probabilities(images: jax.Array) -> tuple[jax.Array, ...]:
        probs, class_probs = predict_probabilities(model, images, tta_hflip=False)
        return (probs,) if class_probs is None else (probs, class_probs)

    return probabilities


def export_checkpoint(
    path: str | Path,
    out: str | Path,
    format: str,
    *,
    step: int | None = None,
    best: bool = False,
    average_top: int = 0,
    average_last: int = 0,
    image_size: int | None = None,
) -> Path:
    """Exports the model of a training run (latest `step`, `best`, or the `average_top` best or `average_last`
    latest steps averaged, as `predict` picks them) or of a model directory to `out` in `format` ('onnx' or
    'stablehlo'), at `image_size` (default: the training config's `data.image_size`)."""
    from siim_jax.training.checkpoints import restore_for_inference

    _require(format)  # before the checkpoint is read
    model, config = restore_for_inference(path, step=step, best=best, average_top=average_top,
                                          average_last=average_last)
    return export_model(model, config.model, out, format, checkpoint_image_size(path, config, image_size))


def export_model(
    model: nnx.Module, model_config: ml_collections.ConfigDict, out: str | Path, format: str, image_size: int
) -> Path:
    """Exports `model` (built from `model_config`) for images of `image_size` to `out` in `format`, computing in
    float32 whatever the config's compute dtype (the parameters are float32 anyway)."""
    _require(format)
    if model_config.get("encoder_only", False):
        raise ValueError("a bare encoder gives feature maps, not masks: export a UNet")
    if model_config.dtype != "float32":
        model = with_compute_dtype(model, model_config, "float32")
    if format == "onnx":
        return export_onnx(model, model_config, out, image_size)
    return export_stablehlo(model, out, image_size)


def export_onnx(model: nnx.Module, model_config: ml_collections.ConfigDict, out: str | Path, image_size: int) -> Path:
    """Writes `model` as one ONNX file with a dynamic batch dimension (see the module's docstring)."""
    jax2onnx, onnx = _onnx_modules()
    spec = jax.ShapeDtypeStruct((BATCH, image_size, image_size), jnp.uint8)
    names = OUTPUT_NAMES if model_config.cls_head else OUTPUT_NAMES[:1]
    with _quiet("onnx_ir"):  # it logs a warning for each shape constant it does not annotate
        proto = jax2onnx.to_onnx(
            forward(model), [spec], model_name="siim_jax_unet", input_names=[INPUT_NAME], output_names=list(names)
        )
    metadata = {
        "producer": f"siim-jax {importlib.metadata.version('siim-jax')}",
        "encoder": model_config.encoder,
        "attention": str(model_config.attention),
        "image_size": str(image_size),
        INPUT_NAME: INPUT_DESCRIPTION.format(size=image_size),
        "outputs": OUTPUT_DESCRIPTION.format(names=", ".join(names)),
    }
    onnx.helper.set_model_props(proto, metadata)
    proto.graph.input[0].doc_string = metadata[INPUT_NAME]
    onnx.checker.check_model(proto)
    return _write_whole(out, proto.SerializeToString())


def export_stablehlo(
    model: nnx.Module, out: str | Path, image_size: int, platforms: Sequence[str] = PLATFORMS
) -> Path:
    """Writes `model` as a serialized `jax.export.Exported` for `platforms`, its batch dimension symbolic."""
    (batch,) = jax.export.symbolic_shape(BATCH)
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size), jnp.uint8)
    exported = jax.export.export(jax.jit(forward(model)), platforms=platforms)(spec)
    return _write_whole(out, bytes(exported.serialize()))


def _require(format: str) -> None:
    """Refuses an unknown format, and ONNX without the packages it needs."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "onnx":
        _onnx_modules()


def _onnx_modules():
    """(jax2onnx, onnx), or a MissingExtraError that says what to install."""
    try:
        import jax2onnx
        import onnx
    except ImportError as error:
        raise MissingExtraError(f"ONNX export needs the 'export' extra: {INSTALL_EXTRA} ({error})") from error
    return jax2onnx, onnx


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _write_whole(path: str | Path, data: bytes) -> Path:
    """Writes `data` durably: `path` is the whole file or what it was before."""
    with durable_file(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)
