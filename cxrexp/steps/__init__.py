"""Steps: one module per entry point (preprocess, train, evaluate, promote, predict, main).

Each turns its flags' config into calls on the core and the edges and returns a run id or an exit
code; ``cxrexp.cli`` is the only importer. No step imports another: what two steps share (a
preprocess run that train reuses, an evaluate run that promote starts) lives in
``cxrexp.mlflow_edge``. May import everything below it: ``tuning``, ``mlflow_edge``, the core.
"""
