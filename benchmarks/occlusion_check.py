"""The occlusion check on real models: what each model of a lungs_compare run can still do with the
lungs hidden, and with only the lungs shown, on the validation split and the external dev pairings.

Run from the project root after ``benchmarks/lungs_compare.py --work W`` (it reuses W's MLflow store,
its registered models ``mini-<mode>`` and their prepared data; needs ../shared/data):

    python benchmarks/occlusion_check.py --work W [--modes none,crop] [--sets val,nih,other] [--n-bootstrap 1000]
                                         [--margin 0.03] [--csv occlusion.csv] [--report-only]

Per model (mode, training seed) and set:

- ``val``: the model's own validation split (what choices may be made on);
- ``nih`` / ``other``: Hannover COVID vs NIH normals / vs the lung-seg-nlm ``_0`` normals
  (cxr-external-dev, lung-seg-nlm), prepared as ``evaluate -P external`` prepares them: the model's
  image settings and its own segmenter (a lung-view model), into W, never into the data folders;
- ``test``: the internal test split (printed for the record, never chosen on).

Lung masks: the ones stored with the prepared images (a lung-view model's segmenter's, mapped into
its view), else the store's ``cxr-lung-seg@champion`` applied to the stored image (whole-image
models). Printed: n, the whole view's ROC-AUC, the lungs-only and outside-only ROC-AUC with bootstrap
CIs, and each view's paired AUC change against the whole view (``cxrexp.evaluation.occlusion``, the
same code ``evaluate`` runs on the test split). Then, per mode and set, how many models promote's
occlusion gate (``cxrexp.promotion``, the same decision ``promote`` makes from an evaluate run's metrics)
lets through at each ``--gate-losses`` margin: how that gate's default margin was chosen, on the
validation split with ``mask`` models (they see only the lungs) as the positive control and ``none``
models (they read the surroundings) as the negative one. Nothing is chosen automatically here;
docs/lungs.md and docs/serving.md say what was read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from common import PROJECT_ROOT, load_average, use_store  # noqa: E402  (benchmarks/common.py)

SHARED = PROJECT_ROOT.parent / "shared" / "data"
SETS = ("val", "nih", "other", "test")


def pairing_tree(root: Path, name: str) -> Path:
    """A Kaggle-layout tree of links for one external pairing (the data folders are only read)."""
    normals = {"nih": sorted((SHARED / "cxr-external-dev" / "Normal" / "images").glob("*")),
               "other": sorted((SHARED / "lung-seg-nlm" / "images").glob("*_0.png"))}[name]
    tree = root / f"pairing-{name}"
    for cls, files in (("COVID", sorted((SHARED / "cxr-external-dev" / "COVID" / "images").glob("*"))),
                       ("Normal", normals)):
        folder = tree / cls / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for path in files:
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return tree


def model_versions(client, name: str) -> dict[int, str]:
    """Training seed -> ``models:/name/version`` (the newest version per seed)."""
    out: dict[int, tuple[int, str]] = {}
    for version in client.search_model_versions(f"name='{name}'"):
        seed = int(client.get_run(version.run_id).data.params.get("seed", -1))
        number = int(version.version)
        if seed not in out or number > out[seed][0]:
            out[seed] = (number, f"models:/{name}/{number}")
    return {seed: uri for seed, (_, uri) in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a benchmarks/lungs_compare.py work folder")
    parser.add_argument("--modes", default="none,crop")
    parser.add_argument("--sets", default="val,nih,other")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--margin", type=float, default=None,
                        help="widen the masks by this share of the side (default: the product's OCCLUSION_MARGIN)")
    parser.add_argument("--csv", default="occlusion.csv", help="the table's file in --work")
    parser.add_argument("--audit", action="store_true",
                        help="also run evaluate's heatmap audit (HiResCAM against the same lung masks, at the model's "
                             "own threshold and evaluate's default gates) on each set, beside the occlusion check")
    parser.add_argument("--gate-losses", default="0.02,0.03,0.05,0.08,0.10",
                        help="promote --max-lungs-only-loss values to show the occlusion gate's verdicts at")
    parser.add_argument("--report-only", action="store_true", help="only print the table of --work's occlusion.csv")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    losses = [float(v) for v in args.gate_losses.split(",") if v.strip()]
    if args.report_only:
        report(pd.read_csv(work / args.csv))
        gate_table(pd.read_csv(work / args.csv), losses)
        return 0
    if not (work / "mlflow.db").is_file():
        print(f"{work} holds no mlflow.db: run benchmarks/lungs_compare.py --work {work} first", file=sys.stderr)
        return 2
    sets = args.sets.split(",")
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        print(f"unknown sets {unknown}: choose from {SETS}", file=sys.stderr)
        return 2
    print(f"work folder: {work}; load average at start: {load_average()}")
    use_store(work)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import mlflow

    from cxrexp.config import EvaluateConfig, PreprocessConfig
    from cxrexp.data.pipeline import run_preprocess
    from cxrexp.data.tfdata import predict_probabilities
    from cxrexp.evaluation.occlusion import OCCLUSION_MARGIN, occlusion_for
    from cxrexp.mlflow_edge.evaluation_run import audit_segmenter, training_dataset
    from cxrexp.mlflow_edge.model_uri import describe_model
    from cxrexp.mlflow_edge.serving import load_classifier

    client = mlflow.MlflowClient()
    margin = OCCLUSION_MARGIN if args.margin is None else args.margin
    print(f"masks widened by {margin:.3f} of the image side")
    rows = []
    for mode in args.modes.split(","):
        for seed, uri in sorted(model_versions(client, f"mini-{mode}").items()):
            loaded = load_classifier(uri)
            segment, segmenter = audit_segmenter(EvaluateConfig(audit_lung_model="models:/cxr-lung-seg@champion"),
                                                 loaded)
            trained_on = training_dataset(describe_model(uri))

            def predict(pixels: np.ndarray, model=loaded.keras_model) -> np.ndarray:
                return predict_probabilities(model, pixels, np.arange(len(pixels)), 64).astype(np.float64)

            for set_name in sets:
                if set_name in ("val", "test"):
                    dataset = trained_on
                    frame = dataset.split_frame(set_name)
                else:
                    dataset = run_preprocess(PreprocessConfig(
                        data_dir=str(pairing_tree(work / "occlusion", set_name)), classes=("COVID", "Normal"),
                        positive_class="COVID", image=loaded.image_spec,
                        out_dir=str(work / "occlusion" / f"prepared-{mode}-{seed}-{set_name}"), exclude=(),
                    ), progress=False, lung_masks=loaded.lung_masks).dataset
                    frame = dataset.manifest
                # The whole view's probabilities once, for the occlusion check and the heatmap audit's cells.
                whole = predict_probabilities(loaded.keras_model, dataset.images(), frame["row"].to_numpy(np.int64),
                                              64).astype(np.float64)
                result, note = occlusion_for(dataset, frame, predict, n_bootstrap=args.n_bootstrap, seed=42,
                                             segment=segment, segmenter_name=segmenter, margin=margin, whole=whole)
                row = {"mode": mode, "seed": seed, "set": set_name, "margin": margin, "n": result.n, "of": len(frame),
                       **result.logged_metrics()}
                if args.audit:
                    row.update(heatmap_audit(loaded, dataset, frame, whole, segment, segmenter))
                rows.append(row)
                print(f"{mode} seed {seed} {set_name}: {note}; " + " | ".join(result.reading or (result.reason,)),
                      flush=True)
            pd.DataFrame(rows).to_csv(work / args.csv, index=False)
    report(pd.DataFrame(rows))
    gate_table(pd.DataFrame(rows), losses)
    print(f"load average at end: {load_average()}")
    return 0


def heatmap_audit(loaded, dataset, frame: pd.DataFrame, probabilities: np.ndarray, segment,
                  segmenter: str) -> dict[str, float]:
    """Evaluate's shortcut audit (``audit.shortcut_audit``, its default gates) on ``frame``'s rows, at the
    model's own threshold (``probabilities``: the model's, for those rows in order): ``audit_lung_focus``,
    ``audit_lift``, ``audit_n``, ``audit_passed``."""
    from cxrexp.config import EvaluateConfig
    from cxrexp.evaluation import audit

    cfg = EvaluateConfig()
    frame = frame.reset_index(drop=True)
    cells = audit.confusion_cells(frame["label"].to_numpy(), probabilities >= loaded.threshold)
    outcome, _ = audit.shortcut_audit(loaded.keras_model, dataset, frame, cells, min_lung_focus=cfg.min_lung_focus,
                                      seed=cfg.seed, segment=segment, segmenter_name=segmenter,
                                      min_heatmaps=cfg.min_audit_heatmaps, min_lung_focus_lift=cfg.min_lung_focus_lift)
    result = outcome.result
    return {"audit_lung_focus": result.lung_focus_mean, "audit_lift": result.lung_focus_lift_mean,
            "audit_n": float(result.n), "audit_passed": float(result.passed)}


def report(frame: pd.DataFrame) -> None:
    """One markdown table: per model and set, each view's AUC [CI] and the paired change."""
    def cell(row, key: str, signed: bool = False) -> str:
        value, low, high = row.get(key, np.nan), row.get(f"{key}_ci_low", np.nan), row.get(f"{key}_ci_high", np.nan)
        if not np.isfinite(value):
            return "-"
        fmt = "{:+.3f}" if signed else "{:.3f}"
        return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"

    from cxrexp.evaluation.occlusion import OCCLUDED, VIEW_LABELS, auc_metric, change_metric

    views = [(view, VIEW_LABELS[view]) for view in OCCLUDED]
    print("\n| mode | seed | set | n | whole AUC | " + " | ".join(f"{label} AUC [95% CI] | change [paired CI]"
                                                         for _, label in views) + " |")
    print("|---|---|---|---|---|" + "---|---|" * len(views))
    for _, row in frame.sort_values(["mode", "set", "seed"], kind="stable").iterrows():
        whole = row.get(auc_metric("whole"), np.nan)
        cells = " | ".join(f"{cell(row, auc_metric(view))} | {cell(row, change_metric(view), True)}"
                           for view, _ in views)
        print(f"| {row['mode']} | {row['seed']} | {row['set']} | {int(row['n'])} of {int(row['of'])} | "
              f"{whole:.3f} | {cells} |")


def gate_table(frame: pd.DataFrame, losses: list[float]) -> None:
    """Per mode and set: the models promote's occlusion gate passes at each margin (of those scored)."""
    from cxrexp.config import OCCLUSION_MARGIN
    from cxrexp.promotion import OCCLUSION_GATE, Evidence, Gates, decide

    def passes(row: pd.Series, loss: float) -> bool:
        metrics = {k: float(v) for k, v in row.items() if str(k).startswith("occlusion_") and pd.notna(v)}
        decision = decide(Evidence(version=f"{row['mode']}-{row['seed']}", metrics=metrics,
                                   occlusion_note="from occlusion_check.py", occlusion_margin=float(row["margin"])),
                          None, Gates(max_lungs_only_loss=loss, max_occlusion_margin=max(OCCLUSION_MARGIN, float(row["margin"]))))
        return bool(decision.gate_values[OCCLUSION_GATE]["passed"])

    print("\nThe occlusion gate (promote --max-lungs-only-loss L): models passed, by mode and set (seeds in order)")
    print("| mode | set | seeds | " + " | ".join(f"L = {loss:g}" for loss in losses) + " |")
    print("|---|---|---|" + "---|" * len(losses))
    for (mode, set_name), group in frame.sort_values(["mode", "set", "seed"], kind="stable").groupby(
            ["mode", "set"], sort=False):
        cells = []
        for loss in losses:
            verdicts = [passes(row, loss) for _, row in group.iterrows()]
            cells.append(f"{sum(verdicts)} of {len(verdicts)} (" + "".join("P" if v else "F" for v in verdicts) + ")")
        print(f"| {mode} | {set_name} | {', '.join(str(s) for s in group['seed'])} | " + " | ".join(cells) + " |")
    if "audit_passed" in frame.columns:
        print("\nThe heatmap audit (evaluate's default gates, the model's threshold) on the same sets")
        print("| mode | set | seed | heatmaps | lung focus | lift | passed |")
        print("|---|---|---|---|---|---|---|")
        for _, row in frame.sort_values(["mode", "set", "seed"], kind="stable").iterrows():
            if pd.notna(row.get("audit_passed")):
                print(f"| {row['mode']} | {row['set']} | {row['seed']} | {int(row['audit_n'])} | "
                      f"{row['audit_lung_focus']:.2f} | {row['audit_lift']:.2f} | {'yes' if row['audit_passed'] else 'no'} |")


if __name__ == "__main__":
    sys.exit(main())
