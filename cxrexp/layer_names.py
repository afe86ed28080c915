"""The names a cxrexp classifier's layers carry: the contract between the model builder
(``cxrexp.learn.model``) and the code that reads a reloaded model (Grad-CAM in
``cxrexp.evaluation.gradcam``, the served model). One home, so neither side restates a string.
Imports nothing.
"""

INPUT_NAME = "image"  # float32 (S, S, 1) in [0, 1]
LOGIT_NAME = "logit"  # Dense(1): the pre-sigmoid score Grad-CAM differentiates
PROBABILITY_NAME = "probability"  # sigmoid(logit)

__all__ = ["INPUT_NAME", "LOGIT_NAME", "PROBABILITY_NAME"]
