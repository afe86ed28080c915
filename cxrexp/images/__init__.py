"""Images: bytes in, uint8 grey arrays out. The bottom of the pipeline.

Owns decoding and checking files (``decode``: PNG/JPEG, 8/16-bit, 1/3/4 channels, bombs and truncated
files rejected with a reason), the transforms both training and serving apply (``transforms``:
resize, CLAHE, gamma, masks), perceptual hashes (``hashing``), the built-in synthetic chest X-rays
(``synthetic``) and the served model's pure request half (``request_images``: request rows to image
batches, reasons per bad row, labels).

May import: ``cxrexp.config`` and the libraries it needs (NumPy, OpenCV, imagecodecs, Pillow,
imagehash). Never MLflow, Optuna or TensorFlow; nothing here writes a file.
"""
