"""Lungs: where the lungs are in an X-ray, so a classifier can be made to look there.

Owns mask post-processing, plausibility and the lung crop (``masks``, pure NumPy/OpenCV) and the
segmenter model (``segmenter``: a small Keras U-Net, its loss, training and prediction; the one module
here that imports TensorFlow).

May import: ``cxrexp.images`` and the base modules. Never MLflow or Optuna.
"""
