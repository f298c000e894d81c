"""Inference: checkpoint → probabilities (`predictor.Inference`), ensembles, post-processing, submissions, overlays
and DICOM Segmentation objects. Imports the foundation modules, data, models and training only."""
