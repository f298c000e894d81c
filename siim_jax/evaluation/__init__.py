"""Evaluation: challenge metrics on labelled images, the post-processing search, cross-validation and out-of-fold
files. Imports every layer below the commands."""
