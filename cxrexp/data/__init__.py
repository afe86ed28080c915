"""Data: a dataset tree on disk becomes a prepared, split, content-addressed dataset.

Owns finding images and masks in a folder (``discovery``), reading one file as the pipeline needs it
(``files``), duplicate groups and the leak-free split (``split``), the prepared-dataset format
(``store``: atomic writer with a COMPLETE marker, a reader that says how to fix each problem), the
parallel preprocess pipeline (``pipeline``) and the ``tf.data`` input pipeline over a prepared
dataset (``tfdata``, the one module here that imports TensorFlow).

May import: ``cxrexp.images`` and the base modules (``config``, ``errors``, ``tags``). Never MLflow
or Optuna; it reads the data folder and writes only under ``out_dir``.
"""
