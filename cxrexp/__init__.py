"""cxrexp: MLflow-tracked experiments for COVID-19 detection in chest X-rays.

The packages, bottom to top (each may import only those below it; the contracts are in
pyproject.toml and docs/architecture.md draws them): ``config``/``errors``/``tags``/``layer_names``
(facts every layer shares), ``images``, ``data``, ``evaluation``, ``learn`` and ``promotion`` (the
pure core), ``mlflow_edge``, ``tuning``, ``steps``, ``cli``. Importing the package imports nothing.
"""
