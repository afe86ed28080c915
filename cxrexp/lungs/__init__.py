"""Lungs: where the lungs are in an X-ray, so a classifier can be made to look there.

Owns mask post-processing, plausibility and the lung crop (``masks``, pure NumPy/OpenCV) and the
segmenter model (``segmenter``: a small Keras U-Net, its loss, training and prediction; the one module
here that imports TensorFlow), the lung view of one film (``view``), the request rows through it
(``request_views``), fallback counting (``fallbacks``) and which segmenter ``main`` uses
(``segmenter_choice``, a pure decision).

May import: ``cxrexp.images`` and the base modules. Never MLflow or Optuna.
"""
