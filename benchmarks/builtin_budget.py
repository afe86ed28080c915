"""Choose the built-in task's difficulty and main's training budget on the VALIDATION split.

Run from the project root:

    python benchmarks/builtin_budget.py --faintest 0.04,0.10,0.16 --epochs 60

For each ``synthetic_faintest`` (the opacity strength of the faintest positive, ``SyntheticSpec``),
the built-in set is prepared exactly as ``main`` prepares it (defaults: 1,200 images, 128 px, cut to
its lungs by a segmenter trained on its own masks with main's segment settings) and one
model is trained with main's settings (``TrainConfig`` defaults, ``--epochs`` as the budget, early
stopping on validation AUC). Printed per row: validation ROC-AUC, and sensitivity and specificity at
the model's own threshold (chosen on the same split, so optimistic), the epochs used, and the wall
seconds of preprocess + training on this machine. The test split is never read: the point is to pick
defaults that clear promote's gates (0.85 / 0.8 / 0.8) with room to spare before any test figure
exists. The segment run goes to a throw-away MLflow store and prepared data to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import use_store  # noqa: E402  (benchmarks/common.py)

from cxrexp.config import MainConfig, PreprocessConfig, TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faintest", default="0.04,0.10,0.16", help="comma-separated synthetic_faintest values")
    parser.add_argument("--epochs", type=int, default=60, help="the training budget (early stopping may end sooner)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cxrexp-builtin-") as out:
        # As main prepares it: a segmenter trained on the built-in set's masks (main's seg settings, a
        # segment run in a throw-away store), then the default lung view cut with it.
        use_store(Path(out))
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from cxrexp.data.pipeline import run_preprocess
        from cxrexp.learn.training import train_model, validation_metrics
        from cxrexp.mlflow_edge import preprocess_run, segmenter_run

        lung_model = segmenter_run.ensure(MainConfig().segment_config())
        for faintest in (float(v) for v in args.faintest.split(",")):
            started = time.perf_counter()
            cfg = PreprocessConfig.flat(out_dir=out, synthetic_faintest=faintest, seed=args.seed, lung_model=lung_model)
            prepared = run_preprocess(cfg, progress=False, lung_masks=preprocess_run.lung_masks_for(cfg.image)).dataset
            cfg = replace(TrainConfig(), epochs=args.epochs, seed=args.seed)
            train_rows, train_labels = prepared.split_rows("train")
            val_rows, val_labels = prepared.split_rows("val")
            result = train_model(cfg, prepared.images(), prepared.image_size, train_rows, train_labels, val_rows,
                                 val_labels, verbose=0)
            found = validation_metrics(result.val_labels, result.val_probabilities, cfg, result.threshold)
            rows.append((faintest, found["val_roc_auc"], found["val_sensitivity"], found["val_specificity"],
                         result.epochs_trained, time.perf_counter() - started))
            print(f"faintest {faintest:.2f}: val AUC {rows[-1][1]:.3f}, sens {rows[-1][2]:.3f}, spec {rows[-1][3]:.3f} "
                  f"at the model's threshold, {rows[-1][4]} epochs, {rows[-1][5]:.0f} s", flush=True)
    print("\n| faintest | val ROC-AUC | val sensitivity | val specificity | epochs | seconds |")
    print("|---|---|---|---|---|---|")
    for faintest, auc, sens, spec, epochs, seconds in rows:
        print(f"| {faintest:.2f} | {auc:.3f} | {sens:.3f} | {spec:.3f} | {epochs} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
