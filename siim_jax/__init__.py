"""siim-jax: pneumothorax classification and segmentation on chest radiographs (SIIM-ACR 2019) in JAX/Flax.

The names below are the public API; each is imported on first use, so that `import siim_jax.data.rle` (or a
grain worker that unpickles a data transform) does not load JAX and the model stack.

    from siim_jax import Inference, predict_submission, read_dicom, decode_rle
"""

from __future__ import annotations

import importlib

# public name -> (module, attribute)
_EXPORTS = {
    # data
    "read_dicom": ("siim_jax.data.dicom", "read_dicom"),
    "DicomError": ("siim_jax.data.dicom", "DicomError"),
    "decode_rle": ("siim_jax.data.rle", "decode"),
    "encode_rle": ("siim_jax.data.rle", "encode"),
    "RLEError": ("siim_jax.data.rle", "RLEError"),
    "read_labels": ("siim_jax.data.labels", "read_labels"),
    "build_index": ("siim_jax.data.labels", "build_index"),
    "generate_synthetic": ("siim_jax.data.synthetic", "generate"),
    # configs
    "load_config": ("siim_jax.config_utils", "load_config"),
    "default_config": ("siim_jax.configs.defaults", "default_config"),
    # models
    "build_model": ("siim_jax.models", "build_model"),
    "SegOutput": ("siim_jax.models", "SegOutput"),
    "convert": ("siim_jax.models.convert", "convert"),
    "save_model": ("siim_jax.models.io", "save_model"),
    "load_model": ("siim_jax.models.io", "load_model"),
    # training
    "train_and_evaluate": ("siim_jax.training.loop", "train_and_evaluate"),
    # inference
    "Inference": ("siim_jax.inference.predictor", "Inference"),
    "Ensemble": ("siim_jax.inference.ensemble", "Ensemble"),
    "Member": ("siim_jax.inference.ensemble", "Member"),
    "load_inference": ("siim_jax.inference.ensemble", "load_inference"),
    "PostProcess": ("siim_jax.inference.postprocess", "PostProcess"),
    "predict_submission": ("siim_jax.inference.submission", "predict_submission"),
    "submission_items": ("siim_jax.inference.submission", "submission_items"),
    "write_submission": ("siim_jax.inference.submission", "write_submission"),
    # evaluation
    "evaluate_images": ("siim_jax.evaluation.evaluate", "evaluate_images"),
    "labelled_frame": ("siim_jax.evaluation.evaluate", "labelled_frame"),
    "summarise": ("siim_jax.evaluation.evaluate", "summarise"),
    "predict_fold": ("siim_jax.evaluation.tune", "predict_fold"),
    "tune": ("siim_jax.evaluation.tune", "tune"),
    "run_cv": ("siim_jax.evaluation.cv", "run_cv"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'siim_jax' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
