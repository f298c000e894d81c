"""Data formats of the SIIM-ACR challenge: DICOM images, RLE masks, label files, synthetic data and pipelines."""
