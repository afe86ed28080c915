"""Re-decide the ``batch_norm`` default on the validation split and the external dev pairings only.

Run from the project root (needs ../shared/data: cxr-mini, cxr-masks, lung-seg-nlm, cxr-external-dev):

    python benchmarks/decide_batch_norm.py [--seeds 42,1,2] [--settings false,true]

The default was first switched off by a cxr-mini *test* ROC-AUC (docs/benchmarks.md, "Expected
test-split figures"); this script makes the same choice again without reading any test figure.
Everything goes through the product in a temporary MLflow store: one ``preprocess`` of cxr-mini
(the defaults it decided under, pinned since the lung-field defaults of 2026-12-06: whole images,
CLAHE clip 2, every file, 128 px, split seed 42), then per setting and training seed one ``train``
(Youden's threshold, as then) with every other default. Read per model:

- from the train run: validation ROC-AUC (the split that drove early stopping, so optimistic for
  both settings alike), sensitivity and specificity at the model's own threshold, the best epoch;
- as served (the pyfunc model on raw file bytes): ROC-AUC and specificity on the two external dev
  pairings of ``lungs_compare.py`` (``nih``: Hannover COVID vs NIH normals; ``other``: Hannover COVID
  vs Montgomery/Shenzhen normals).

``evaluate`` is never run, so no test-split figure exists for these models. Printed: a row per
model, then the mean over seeds per setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from common import load_average, use_store  # noqa: E402  (benchmarks/common.py)
from lungs_compare import SHARED, collections, served_probabilities  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--settings", default="false,true", help="batch_norm values to compare")
    parser.add_argument("--work", default="", help="work folder (default: a new temporary one)")
    args = parser.parse_args()
    needed = [SHARED / d for d in ("cxr-mini", "lung-seg-nlm", "cxr-external-dev")]
    if missing := [str(d) for d in needed if not d.is_dir()]:
        print(f"this benchmark needs the shared data sets; missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    work = Path(args.work or tempfile.mkdtemp(prefix="decide-bn-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}; load average at start: {load_average()}", flush=True)
    use_store(work)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import mlflow

    from cxrexp import cli
    from cxrexp.evaluation.metrics import roc_auc

    if cli.main(["preprocess", "--data-dir", str(SHARED / "cxr-mini"), "--out-dir", str(work / "prepared"),
                 "--seed", "42", "--lungs", "none", "--clip-limit", "2.0", "--exclude", ""]):  # the defaults it decided under
        return 1
    pre = mlflow.search_runs(search_all_experiments=True, output_format="list",
                             filter_string="tags.`cxrexp.step` = 'preprocess'",
                             max_results=1)[0]
    sets = {name: items for name, items in collections().items() if name in ("nih", "other")}
    client = mlflow.MlflowClient()
    rows = []
    for setting in args.settings.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"bn-{setting}"
            if cli.main(["train", "--data", pre.info.run_id, "--seed", str(seed), "--threshold-rule", "youden",
                         "--batch-norm", setting, "--registered-model-name", name]):
                return 1
            version = client.get_model_version_by_alias(name, "challenger")
            m = client.get_run(version.run_id).data.metrics
            row = {"batch_norm": setting, "seed": seed, "val_auc": m["val_roc_auc"],
                   "val_sens": m["val_sensitivity"], "val_spec": m["val_specificity"],
                   "best_epoch": m.get("best_epoch", np.nan)}
            for set_name, items in sets.items():
                probability, called = served_probabilities(f"models:/{name}/{version.version}", [p for p, _ in items])
                labels = np.array([lab for _, lab in items])
                kept = ~np.isnan(probability)
                row[f"{set_name}_auc"] = roc_auc(labels[kept], probability[kept])
                row[f"{set_name}_spec"] = 1 - called[kept & (labels == 0)].mean()
            rows.append(row)
            pd.DataFrame(rows).to_csv(work / "batch_norm.csv", index=False)
            print(f"done: batch_norm={setting} seed {seed}: {row}; load average {load_average()}", flush=True)

    frame = pd.DataFrame(rows)
    columns = ["val_auc", "val_sens", "val_spec", "nih_auc", "nih_spec", "other_auc", "other_spec"]
    print("\n| batch_norm | seed | val AUC | val sens | val spec | best epoch | NIH AUC | NIH spec | other AUC | other spec |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in frame.itertuples():
        print(f"| {r.batch_norm} | {r.seed} | {r.val_auc:.3f} | {r.val_sens:.3f} | {r.val_spec:.3f} | {r.best_epoch:.0f} "
              f"| {r.nih_auc:.3f} | {r.nih_spec:.2f} | {r.other_auc:.3f} | {r.other_spec:.2f} |")
    print("\nMean over seeds:")
    print("| batch_norm | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for setting, means in frame.groupby("batch_norm")[columns].mean().iterrows():
        print(f"| {setting} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    print(f"\nload average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
