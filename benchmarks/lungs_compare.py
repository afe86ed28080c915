"""lungs=none vs crop vs mask on cxr-mini over several training seeds, scored off the database.

Run from the project root (needs ../shared/data: cxr-mini, cxr-masks, lung-seg-nlm, cxr-external-dev):

    python benchmarks/lungs_compare.py [--seeds 42,1,2] [--modes none,crop,mask] [--seg-size 64] [--seg-epochs 10] [--seg-conv standard]
    python benchmarks/lungs_compare.py --modes crop,crop/margin=0.10,crop/aspect=stretch --exclude @paediatric-normals

A mode is a ``lungs`` setting, optionally with image settings after slashes
(``crop/margin=0.10/aspect=stretch/fill=128/clip=4.0/exclude=``: preprocess's ``--lung-margin``, ``--lung-aspect``,
``--lung-fill``, ``--clip-limit``, ``--exclude``, where ``exclude=`` keeps every file) or train settings (``bn=true``:
``--batch-norm``; ``filters=32-64-128-256``: ``--filters``; ``rule=youden``: ``--threshold-rule``). Every other
setting is the product's default. ``--exclude`` is passed to every preprocess whose mode does not set it. Each row also shows
the train run's validation ROC-AUC: with the dev pairings, that is what a choice between modes may
be made on (the internal column is the test split: reported, never chosen on).

Everything goes through the product (a temporary MLflow store): one ``segment`` run (cxr-masks plus
the lung-seg-nlm tuberculosis films; the ``_0`` normals are left out because they are external
normals here), one ``preprocess`` per mode (split seed 42 for all, so every model is tested on the
same internal cases, unless a mode keeps other files: each mode is scored on its own test split, and a
paired difference on the cases both test splits share), then per mode and training seed ``train`` with its defaults and ``evaluate``
(internal test split, for the audit's lung focus and lift). Every model is then asked, **as served**
(the pyfunc model on raw file bytes, its own segmenter and threshold inside), about:

- ``internal``: the cxr-mini test split;
- ``nih``: Hannover COVID (cxr-external-dev) vs NIH normals (cxr-external-dev; NIH is where the
  database's normals come from, so a hospital shortcut helps here);
- ``other``: Hannover COVID vs the lung-seg-nlm ``_0`` normals (Montgomery, Shenzhen: no shortcut);
- ``vp`` and ``tb``: other diseases, never COVID: the Viral Pneumonia films of cxr-masks and the
  lung-seg-nlm ``_1`` tuberculosis films; the figure is the share the model calls COVID. (The
  ``_1`` films are in the segmenter's training set, so their crops are slightly better than a new
  hospital's would be; the classifier never saw any of them.)

Printed: per mode and seed ROC-AUC (with its bootstrap CI) and specificity at the model's own
threshold on each pairing, the COVID-call shares, the audit's lung focus; then per seed the paired
bootstrap CI of the AUC difference of each mode against ``none`` on the same cases
(``metrics.paired_difference``; against ``none``, or the first mode when ``none`` is not run). Predictions are kept in the work folder (``predictions.csv``);
a later run into the same ``--work`` with other modes keeps the earlier modes' rows and replaces only the (mode, seed)
pairs it runs, so ``--report-only --modes none,crop,mask`` prints them all.
Nothing here is used to choose a default automatically: the README and docs/lungs.md say what was
decided on which pairing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from common import PROJECT_ROOT, load_average, use_store  # noqa: E402  (benchmarks/common.py)

SHARED = PROJECT_ROOT.parent / "shared" / "data"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_PAIRED_CASES = 50  # below this a paired AUC interval on shared test cases means nothing (12 gave [0, 0])


def files(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES)


def collections() -> dict[str, list[tuple[Path, int]]]:
    """name -> [(file, label)] of the off-database sets (label 1 = COVID)."""
    hannover = [(p, 1) for p in files(SHARED / "cxr-external-dev" / "COVID" / "images")]
    return {
        "nih": hannover + [(p, 0) for p in files(SHARED / "cxr-external-dev" / "Normal" / "images")],
        "other": hannover + [(p, 0) for p in files(SHARED / "lung-seg-nlm" / "images", "*_0.png")],
        "vp": [(p, 0) for p in files(SHARED / "cxr-masks" / "Viral Pneumonia" / "images")],
        "tb": [(p, 0) for p in files(SHARED / "lung-seg-nlm" / "images", "*_1.png")],
    }


def served_probabilities(model_uri: str, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(probability, called COVID) per file from the served pyfunc model; NaN where a file is refused."""
    from cxrexp.mlflow_edge.serving import load_pyfunc

    model = load_pyfunc(model_uri)
    probability = np.full(len(paths), np.nan)
    called = np.zeros(len(paths), dtype=bool)
    for start in range(0, len(paths), 32):
        chunk = paths[start : start + 32]
        try:
            answer = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in chunk]}))
        except Exception as exc:  # one refused file refuses its chunk: score the rest one by one
            print(f"  chunk at {start} refused ({exc}); scoring it file by file", file=sys.stderr)
            for offset, path in enumerate(chunk):
                try:
                    row = model.predict(pd.DataFrame({"image": [path.read_bytes()]}))
                except Exception as one:
                    print(f"  skipped {path}: {one}", file=sys.stderr)
                    continue
                probability[start + offset] = float(row["probability"].iloc[0])
                called[start + offset] = bool(row["label"].iloc[0] == "COVID")
            continue
        probability[start : start + len(chunk)] = answer["probability"].to_numpy(float)
        called[start : start + len(chunk)] = (answer["label"] == "COVID").to_numpy()
    return probability, called


IMAGE_FLAGS = {"margin": "--lung-margin", "aspect": "--lung-aspect", "fill": "--lung-fill", "clip": "--clip-limit",
               "exclude": "--exclude"}  # exclude= (empty) keeps every file
TRAIN_FLAGS = {"bn": "--batch-norm", "filters": "--filters",  # filters written with dashes: 32-64-128-256
               "rule": "--threshold-rule"}


def mode_flags(mode: str) -> tuple[str, list[str], list[str]]:
    """``crop/margin=0.10/bn=true`` -> ("crop", preprocess ["--lung-margin", "0.10"], train ["--batch-norm", "true"])."""
    lungs, *settings = mode.split("/")
    flags: list[str] = []
    train_flags: list[str] = []
    for setting in settings:
        key, _, value = setting.partition("=")
        if key in IMAGE_FLAGS and (value or key == "exclude"):  # exclude= (empty) is a setting: keep every file
            flags += [IMAGE_FLAGS[key], value]
        elif key in TRAIN_FLAGS and value:
            train_flags += [TRAIN_FLAGS[key], value.replace("-", ",")]
        else:
            known = ", ".join(k + "=..." for k in (*IMAGE_FLAGS, *TRAIN_FLAGS))
            raise SystemExit(f"mode {mode!r}: {setting!r} is not one of {known}")
    return lungs, flags, train_flags


def safe_name(mode: str) -> str:
    """A mode as a folder and registered-model name."""
    return mode.replace("/", "-").replace("=", "")


def kept_rows(work: Path, modes: list[str], seeds: list[int]) -> tuple[list[dict], list[dict]]:
    """The rows of ``predictions.csv`` and ``audits.csv`` in ``work`` for (mode, seed) pairs not run now."""
    out = []
    for name in ("predictions.csv", "audits.csv"):
        path = work / name
        if not path.is_file():
            out.append([])
            continue
        frame = pd.read_csv(path)
        rerun = frame["mode"].isin(modes) & frame["seed"].isin(seeds)
        out.append(frame[~rerun].to_dict("records"))
    return out[0], out[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--modes", default="none,crop,mask")
    parser.add_argument("--seg-size", type=int, default=64)
    parser.add_argument("--seg-epochs", type=int, default=10)
    parser.add_argument("--seg-conv", default="standard", help="the segmenter's convolutions: standard or separable")
    parser.add_argument("--exclude", default="", help="preprocess -P exclude for every mode (e.g. @paediatric-normals)")
    parser.add_argument("--work", default="", help="work folder (default: a new temporary one)")
    parser.add_argument("--report-only", action="store_true", help="only print the tables of --work's CSVs")
    parser.add_argument("--baseline", default="", help="the mode paired differences are taken against "
                                                       "(default: none when run, else the first mode)")
    args = parser.parse_args()
    if args.report_only:
        report(Path(args.work), args.modes.split(","), [int(s) for s in args.seeds.split(",")], args.baseline)
        return 0
    needed = [SHARED / d for d in ("cxr-mini", "cxr-masks", "lung-seg-nlm", "cxr-external-dev")]
    if missing := [str(d) for d in needed if not d.is_dir()]:
        print(f"this benchmark needs the shared data sets; missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    work = Path(args.work or tempfile.mkdtemp(prefix="lungs-compare-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}; load average at start: {load_average()}")
    use_store(work)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import mlflow

    from cxrexp import cli
    from cxrexp.mlflow_edge import tracking
    from cxrexp.tags import AUDIT_TAG

    seeds = [int(s) for s in args.seeds.split(",")]
    modes = args.modes.split(",")
    client = mlflow.MlflowClient()
    if any(m != "none" for m in modes) and not client.search_registered_models("name='cxr-lung-seg'"):
        code = cli.main(["segment", "--mask-dirs", f"{SHARED / 'cxr-masks'},{SHARED / 'lung-seg-nlm'}",
                         "--exclude", "*_0.png", "--image-size", str(args.seg_size), "--epochs",
                         str(args.seg_epochs), "--conv", args.seg_conv, "--seed", "42"])
        if code:
            return code
    sets = collections()
    # A folder that already holds other modes' results keeps them (a later `--modes mask` into the same
    # folder used to overwrite the earlier modes' rows); the (mode, seed) pairs run now are replaced.
    rows, audits = kept_rows(work, modes, seeds)
    for mode in modes:
        lungs, view_flags, train_flags = mode_flags(mode)
        if args.exclude and "--exclude" not in view_flags:
            view_flags += ["--exclude", args.exclude]
        if cli.main(["preprocess", "--data-dir", str(SHARED / "cxr-mini"), "--out-dir",
                     str(work / f"prepared-{safe_name(mode)}"), "--lungs", lungs, "--seed", "42", *view_flags]):
            return 1
        pre = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.`cxrexp.step` = 'preprocess'",
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        # Each mode's own test split: a mode that keeps other files (exclude=) splits them differently.
        manifest = tracking.resolve_prepared(pre.info.run_id).manifest
        internal = manifest[manifest["split"] == "test"][["source", "label"]].reset_index(drop=True)
        for seed in seeds:
            name = f"mini-{safe_name(mode)}"
            if cli.main(["train", "--data", pre.info.run_id, "--seed", str(seed), "--registered-model-name", name,
                         *train_flags]):
                return 1
            trained = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                         filter_string="tags.`cxrexp.step` = 'train'",
                                         order_by=["attributes.start_time DESC"], max_results=1)[0]
            version = client.get_model_version_by_alias(name, "challenger").version
            uri = f"models:/{name}/{version}"
            cli.main(["evaluate", "--model-uri", uri, "--n-bootstrap", "200", "--gradcam-per-cell", "0"])
            run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                     filter_string="tags.`cxrexp.step` = 'evaluate'",
                                     order_by=["attributes.start_time DESC"], max_results=1)[0]
            m = run.data.metrics
            audits.append({"mode": mode, "seed": seed, "lung_focus": m.get("audit_lung_focus_mean", np.nan),
                           "lift": m.get("audit_lung_focus_lift_mean", np.nan), "audit_n": m.get("audit_n", 0),
                           "audit": run.data.tags.get(AUDIT_TAG, ""),
                           "val_roc_auc": trained.data.metrics.get("val_roc_auc", np.nan)})
            everything = {"internal": [(Path(s), int(lab)) for s, lab in zip(internal["source"], internal["label"])],
                          **sets}
            for set_name, items in everything.items():
                probability, called = served_probabilities(uri, [p for p, _ in items])
                rows += [{"mode": mode, "seed": seed, "set": set_name, "file": str(p), "label": lab,
                          "probability": pr, "called_covid": c}
                         for (p, lab), pr, c in zip(items, probability, called)]
            pd.DataFrame(rows).to_csv(work / "predictions.csv", index=False)
            pd.DataFrame(audits).to_csv(work / "audits.csv", index=False)
            print(f"done: {mode} seed {seed}; load average {load_average()}", flush=True)

    report(work, modes, seeds, args.baseline)
    return 0


def report(work: Path, modes: list[str], seeds: list[int], baseline: str = "") -> None:
    """The tables, from ``predictions.csv`` and ``audits.csv`` in ``work`` (``--report-only`` reruns it)."""
    from cxrexp.evaluation.metrics import bootstrap_ci, paired_difference, roc_auc

    frame = pd.read_csv(work / "predictions.csv").dropna(subset=["probability"])
    audit_frame = pd.read_csv(work / "audits.csv").set_index(["mode", "seed"])
    print("\n| lungs | seed | val AUC | internal AUC (test) | NIH AUC [CI] | NIH spec | other AUC [CI] | other spec | "
          "VP called COVID | TB called COVID | audit lung focus (lift) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (mode, seed), group in frame.groupby(["mode", "seed"], sort=False):
        cells = []
        for set_name in ("internal", "nih", "other"):
            part = group[group["set"] == set_name]
            labels, probs = part["label"].to_numpy(), part["probability"].to_numpy()
            auc = roc_auc(labels, probs)
            low, high = bootstrap_ci(labels, probs, 0.5, 1000, 42)["roc_auc"]
            spec = 1 - part.loc[part["label"] == 0, "called_covid"].mean()
            cells.append(f"{auc:.3f}" if set_name == "internal" else f"{auc:.3f} [{low:.3f}, {high:.3f}] | {spec:.2f}")
        for set_name in ("vp", "tb"):
            cells.append(f"{group.loc[group['set'] == set_name, 'called_covid'].mean():.2f}")
        a = audit_frame.loc[(mode, seed)]
        cells.insert(0, f"{a.get('val_roc_auc', np.nan):.3f}")
        verdict = f", {a['audit']}" if isinstance(a.get("audit"), str) and a.get("audit") else ""  # older audits.csv: none
        cells.append(f"{a['lung_focus']:.2f} ({a['lift']:.2f}x, n={int(a['audit_n'])}{verdict})")
        print(f"| {mode} | {seed} | " + " | ".join(cells) + " |")

    baseline = baseline or ("none" if "none" in modes else modes[0])
    print(f"\nPaired AUC difference against lungs={baseline} (same cases, 2,000 resamples):")
    print("| lungs | seed | internal | NIH | other |")
    print("|---|---|---|---|---|")
    for mode in [m for m in modes if m != baseline]:
        for seed in seeds:
            cells = []
            for set_name in ("internal", "nih", "other"):
                base = frame[(frame["mode"] == baseline) & (frame["seed"] == seed) & (frame["set"] == set_name)]
                this = frame[(frame["mode"] == mode) & (frame["seed"] == seed) & (frame["set"] == set_name)]
                both = base.merge(this, on=["file", "label"], suffixes=("_a", "_b"))
                if both.empty:  # that mode or seed was not run (a report over merged CSVs)
                    cells.append("not run")
                    continue
                if len(both) < MIN_PAIRED_CASES:  # modes that keep different files share few test cases
                    cells.append(f"n={len(both)} shared cases: too few")
                    continue
                d = paired_difference(both["label"].to_numpy(), both["probability_a"].to_numpy(),
                                      both["probability_b"].to_numpy(), seed=42)
                cells.append(f"{d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
                             + ("" if set_name != "internal" else f" (n={len(both)})"))
            print(f"| {mode} | {seed} | " + " | ".join(cells) + " |")
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    sys.exit(main())
