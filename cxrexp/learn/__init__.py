"""Learn: build and fit one classifier (no MLflow, no Optuna).

Owns the CNN (``model``: conv blocks, dense head, ``logit`` and ``probability`` layers), the class
weights and weighted BCE (``losses``) and fitting one model from a ``TrainConfig`` (``training``:
early stopping, schedule, the threshold chosen on validation, the validation summaries and the
search objective). Per-epoch logging and pruning come in as Keras callbacks from the edges.

May import: ``cxrexp.evaluation`` (metrics for the validation threshold), ``cxrexp.data``
(``tfdata``), ``cxrexp.images`` and the base modules; Keras and TensorFlow.
"""
