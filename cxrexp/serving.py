"""Legacy import path, kept so models logged before the re-layering load in a process that has cxrexp.

A raw-image model logged by cxrexp 0.1.0 runs ``from cxrexp.serving import RawImageClassifier`` (its
``raw_image_model.py``). In a fresh process (``mlflow models serve``) that finds the model's own
``code/cxrexp`` copy; in one that has already imported this package (``cxrexp evaluate``,
``cxrexp predict``) Python resolves ``cxrexp.serving`` inside *this* package, so this name must stay.
New models name ``cxrexp.mlflow_edge.serving`` directly. ``tests/test_legacy_models.py`` loads a model
logged by 0.1.0 both ways.
"""

from cxrexp.mlflow_edge.serving import RawImageClassifier

__all__ = ["RawImageClassifier"]
