"""Re-check the shortcut audit's verdicts on seeds and image sizes it was not tuned on, on the VALIDATION split.

Run from the project root (no shared data needed: the built-in synthetic set):

    python benchmarks/audit_recheck.py [--seeds 7,11,13] [--sizes 48,64,96]

The audit's scoring (HiResCAM, salient region >= 0.5 of the peak, the mask widened by one cell, the
cases called positive) and its gate ``min_lung_focus`` 0.5 were chosen on test-split heatmaps of
models trained at 64 px with seeds 42, 1, 2 and 3 (docs/evaluate.md); ``tests/test_audit_verdicts.py``
checks the same settings. This script asks whether those choices hold elsewhere: for each image size
and seed (data seed = training seed, none of them a tuning seed), the two models of the test file
(same CNN, 600 synthetic images, balanced, ``synthetic_faintest`` 0.04, 15 epochs), one trained with
the planted marker on exactly the positives and one clean, are audited on their **validation**
split at the default gates (``min_lung_focus`` and, since 2026-12-07, ``min_lung_focus_lift``). Printed
per model: validation ROC-AUC, for the marker model its AUC on the same images without the letter (the
premise: it reads the letter), the audit's n, mean lung focus, lung-focus lift, border share and verdict. Nothing is logged to MLflow and nothing is chosen automatically.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from common import load_average  # noqa: E402  (benchmarks/common.py)

from cxrexp.config import EvaluateConfig, PreprocessConfig, TrainConfig


def prepared(out: str, size: int, seed: int, shortcut: float):
    from cxrexp.data.pipeline import run_preprocess

    cfg = PreprocessConfig.flat(out_dir=out, image_size=size, synthetic_count=600, synthetic_size=128,
                                synthetic_prevalence=0.5, synthetic_shortcut=shortcut, synthetic_faintest=0.04,
                                seed=seed, workers=1, lungs="none")  # the audit on whole images, as calibrated
    return run_preprocess(cfg, progress=False).dataset


def audited(dataset, size: int, seed: int, gates: EvaluateConfig):
    from cxrexp.data.tfdata import predict_probabilities
    from cxrexp.evaluation import audit
    from cxrexp.evaluation.metrics import roc_auc
    from cxrexp.learn.training import train_model

    cfg = TrainConfig(filters=(8, 16, 32), dense=(16,), epochs=15, patience=8, lr_patience=3, batch_size=32, seed=seed)
    train_rows, train_labels = dataset.split_rows("train")
    val_rows, val_labels = dataset.split_rows("val")
    result = train_model(cfg, dataset.images(), size, train_rows, train_labels, val_rows, val_labels, verbose=0)
    frame = dataset.split_frame("val").sort_values("source", kind="stable").reset_index(drop=True)
    probabilities = predict_probabilities(result.model, dataset.images(), frame["row"].to_numpy(np.int64), 64)
    cells = audit.confusion_cells(frame["label"].to_numpy(), probabilities >= result.threshold)
    outcome, _ = audit.shortcut_audit(result.model, dataset, frame, cells, min_lung_focus=gates.min_lung_focus, seed=seed,
                                      min_lung_focus_lift=gates.min_lung_focus_lift)
    return result.model, frame, roc_auc(frame["label"].to_numpy(), probabilities), outcome.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="7,11,13", help="comma-separated; 42, 1, 2, 3 were the tuning seeds")
    parser.add_argument("--sizes", default="48,64,96", help="comma-separated image sizes (64 was tuned on)")
    args = parser.parse_args()
    from cxrexp.data.tfdata import predict_probabilities
    from cxrexp.evaluation.metrics import roc_auc

    gate = EvaluateConfig()
    print(f"load average at start: {load_average()}; gates min_lung_focus {gate.min_lung_focus}, "
          f"min_lung_focus_lift {gate.min_lung_focus_lift}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cxrexp-audit-recheck-") as out:
        for size in (int(v) for v in args.sizes.split(",")):
            for seed in (int(v) for v in args.seeds.split(",")):
                started = time.perf_counter()
                marker_data = prepared(out, size, seed, 1.0)
                clean_data = prepared(out, size, seed, 0.0)
                model, frame, marker_auc, marker = audited(marker_data, size, seed, gate)
                row_of = dict(zip(clean_data.manifest["source"], clean_data.manifest["row"]))
                unmarked = np.array([row_of[s] for s in frame["source"]], dtype=np.int64)
                without = roc_auc(frame["label"].to_numpy(), predict_probabilities(model, clean_data.images(), unmarked, 64))
                _, _, clean_auc, clean = audited(clean_data, size, seed, gate)
                rows.append((size, seed, marker_auc, without, marker, clean_auc, clean))
                print(f"{size} px seed {seed}: marker AUC {marker_auc:.3f} ({without:.3f} without the letter), "
                      f"focus {marker.lung_focus_mean:.2f} lift {marker.lung_focus_lift_mean:.2f} passed={marker.passed}; "
                      f"clean AUC {clean_auc:.3f}, focus {clean.lung_focus_mean:.2f} lift {clean.lung_focus_lift_mean:.2f} "
                      f"passed={clean.passed}; {time.perf_counter() - started:.0f} s",
                      flush=True)
    print("\n| px | seed | marker: val AUC (without letter) | n | lung focus / lift / border | verdict | "
          "clean: val AUC | n | lung focus / lift / border | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    right = 0
    for size, seed, m_auc, without, m, c_auc, c in rows:
        right += (not m.passed) + c.passed
        print(f"| {size} | {seed} | {m_auc:.3f} ({without:.3f}) | {m.n} | {m.lung_focus_mean:.2f} / "
              f"{m.lung_focus_lift_mean:.2f} / {m.border_share_mean:.2f} | {'pass' if m.passed else 'fail'} | "
              f"{c_auc:.3f} | {c.n} | {c.lung_focus_mean:.2f} / {c.lung_focus_lift_mean:.2f} / "
              f"{c.border_share_mean:.2f} | {'pass' if c.passed else 'fail'} |")
    print(f"\nright verdicts: {right} of {2 * len(rows)} (marker model failed, clean model passed); "
          f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
