"""The MLflow edge: everything that talks to a tracking store or the Model Registry.

Owns runs, params, metrics and artifacts (``tracking``), registry aliases and decision tags
(``registry``), model URIs parsed and resolved once (``model_uri``), the served raw-image pyfunc
model (``serving``), per-epoch logging (``epoch_logging``), and the runs that more than one step
needs: one training run, also the body of every Optuna trial (``training_run``), a preprocess run
and its reuse (``preprocess_run``), an evaluate run (``evaluation_run``) with its logging
(``evaluation_logging``).

May import: the pure core (``learn``, ``promotion``, ``evaluation``, ``data``, ``images``), the base
modules and MLflow. Never Optuna (that is ``cxrexp.tuning``), never a step.
"""
