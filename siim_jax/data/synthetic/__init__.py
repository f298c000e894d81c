"""A synthetic SIIM-ACR dataset written in the challenge's own format (``siim-jax synth``).

``generate`` writes::

    OUT/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    OUT/dicom-images-test/...            (same layout)
    OUT/train-rle.csv                    stage-1 labels: header ``ImageId, EncodedPixels``, lines ``id, rle``
    OUT/sample_submission.csv            the test ids, all ``-1``: header ``ImageId,EncodedPixels``
    OUT/stage_2_train.csv                (``stage2=True``) train and test labels, no spaces, like stage 2

The DICOM files copy the structure of the real ones: CR, Secondary Capture, 1024x1024 8-bit MONOCHROME2, one JPEG
Baseline fragment. ``shapes`` (``synth --shape H W`` or ``--shapes 96x160,160x96``) stretches the 1024² rendering to
other Rows x Columns, with the labels encoded at each image's own size and PixelSpacing stretched alike.
Each image is a procedural chest radiograph (body, lungs with branching vessel markings, ribs, clavicles, spine,
mediastinum and heart, diaphragm) with its own exposure, pose and anatomy. A pneumothorax is a region at the
apical/lateral chest wall with no lung markings, darker than the lung, bounded by a thin bright pleural line, while
the collapsed lung's markings crowd toward the hilum. Its masks are procedural, or the
positive rows of a real label file (``mask_source``), rendered with the same appearance.

``difficulty`` in [0, 1] (default 0.5) sets how the region stands out; it never has lung markings. At the default
the region loses 0.07 of attenuation (``MAX_DARKENING / 2``), about 18 grey levels at a typical exposure, and its
pleural line is about 18 grey levels brighter than the lung beside it; with the missing markings and the denser
collapsed lung, the region averages about 30 grey levels darker than the lung next to it. Difficulty 0 doubles the
darkening and the line; 1 removes both, leaving the missing markings and the collapse. Procedural regions cover
4% (apical or lateral slivers) to 50% (large collapses) of their lung field, median 14%; about 8% of positive
images have one on each side (two label rows). Masks from a real label file keep their place, so some overhang
this anatomy's lung outline; they are rendered as air all the same.

Every random choice for image ``index`` of a split comes from ``SeedSequence(seed, spawn_key=(split, index))``:
images can be made in any order or in parallel, and one seed gives byte-identical files.

Modules, in the order they build on each other: ``patients`` (UIDs, header fields, labels), ``anatomy`` (the body
as smooth fields), ``drawing`` (bones and lung markings), ``pneumothorax``, ``rendering`` (one radiograph and its
mask), ``cases`` and ``writing`` (the dataset on disk); ``siim-jax synth`` is siim_jax.commands.synth.
"""

from siim_jax.data.synthetic.cases import SyntheticCase, synthesize_case
from siim_jax.data.synthetic.patients import DEFAULT_POSITIVE_FRACTION, is_positive
from siim_jax.data.synthetic.rendering import DEFAULT_DIFFICULTY, render_case
from siim_jax.data.synthetic.writing import SyntheticSummary, generate

__all__ = [
    "DEFAULT_DIFFICULTY",
    "DEFAULT_POSITIVE_FRACTION",
    "SyntheticCase",
    "SyntheticSummary",
    "generate",
    "is_positive",
    "render_case",
    "synthesize_case",
]
