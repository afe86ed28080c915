"""Evaluation: judge predictions and explain models (pure).

Owns the metrics and their bootstrap intervals (``metrics``), every figure (``plots``, returned,
never saved), Grad-CAM maths (``gradcam``, the one module here that imports TensorFlow), the
shortcut audit and the seeded choice of cases (``audit``), the test-split evaluation as computed
values (``test_evaluation``) and the HTML model card (``model_card``: values and PNG bytes in, HTML
text out).

May import: ``cxrexp.data`` (a prepared dataset's images and masks), ``cxrexp.images`` and the base
modules. Never MLflow or Optuna, and it never imports ``cxrexp.learn``: the layer names Grad-CAM
needs come from ``cxrexp.layer_names``.
"""
