"""Screen lung-view and training settings fast, on validation and the external dev pairings only.

Run from the project root (needs ../shared/data: cxr-mini, cxr-masks, lung-seg-nlm, cxr-external-dev):

    python benchmarks/lungs_explore.py --work /tmp/lx --name crop --seeds 42,1,2
    python benchmarks/lungs_explore.py --work /tmp/lx --name clip40-stretch --seeds 42,1,2 clip=40 aspect=stretch
    python benchmarks/lungs_explore.py --work /tmp/lx --report
    python benchmarks/lungs_explore.py --work /tmp/lx --report --paired default
    python benchmarks/lungs_explore.py --work /tmp/lx --mean default,patches-256-96 --report --paired default

``lungs_compare.py`` asks every model as served, through every step's MLflow run: right for a decision,
too slow (about five minutes per model) to screen a dozen ideas. This script does the same work without
the runs: once per work folder it trains one segmenter through the product's ``segment`` step (64 px, 10
epochs, cxr-masks and the lung-seg-nlm ``_1`` films; the ``_0`` normals are external normals here) and
takes cxr-mini's split from one ``preprocess`` run (split seed 42, ``--exclude`` as given); it decodes every
film once and segments it once per working size, then per setting builds the lung views with the
product's own ``lungs.view.finish`` (the pixels preprocess and the served model make) and trains with
``learn.training.train_model`` and the ``TrainConfig`` defaults, with the settings given.

Settings (``key=value``): the view's ``lungs``, ``margin``, ``aspect``, ``fill``, ``clip`` (CLAHE clip
limit), ``tiles`` (CLAHE grid), ``enhance``, ``size``; training's ``preset``, ``filters`` (``16-32-64``),
``dense``, ``dropout``, ``bn``, ``augment``, ``epochs``, ``patience``, ``lr``, ``rule`` (threshold rule),
``tspec`` (target specificity). Defaults are the product's.

Printed per seed: validation ROC-AUC (the split early stopping watched), ROC-AUC on Hannover COVID vs NIH
normals and vs Montgomery/Shenzhen normals, the Hannover sensitivity and both specificities at the model's
own threshold (chosen on validation by the rule), the shares of Viral Pneumonia and tuberculosis films
called COVID, and the sensitivity and other-hospital specificity at Youden's threshold on the same
validation split (the rule before the lung-field work; the model is the same, only its threshold differs).
The internal test split is never scored here. Rows are appended to ``<work>/explore.csv`` and each
model's probabilities kept in ``<work>/preds/``; ``--report`` prints the table again, and with
``--paired BASE`` also, per setting and seed that BASE has too, the paired bootstrap difference of the
ROC-AUC on both dev pairings against BASE's model of the same seed (the same films, the same
segmenter: ``metrics.paired_difference``, 2,000 resamples, 95% interval). ``--mean A,B`` first scores
the two-model ensemble of settings A and B (the mean of their probabilities, seed by seed, with its own
threshold chosen on validation by the product's rule) and adds it to the table as setting ``A+B``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from common import load_average, use_store  # noqa: E402  (benchmarks/common.py)
from lungs_compare import SHARED, files  # noqa: E402  (the same shared sets, listed the same way)

SETS = ("hannover", "nih", "nlm0", "vp", "tb")
VIEW_KEYS = {"lungs": str, "margin": float, "aspect": str, "fill": int, "clip": float, "tiles": int, "enhance": str,
             "size": int}
TRAIN_KEYS = {"preset", "filters", "dense", "dropout", "bn", "augment", "epochs", "patience", "lr", "rule", "tspec"}


def build_cache(work: Path, exclude: str) -> None:
    """Segmenter, split and decoded films, once per work folder."""
    import mlflow

    from cxrexp import cli
    from cxrexp.images.decode import decode_grey

    if not mlflow.MlflowClient().search_registered_models("name='cxr-lung-seg'"):
        if cli.main(["segment", "--mask-dirs", f"{SHARED / 'cxr-masks'},{SHARED / 'lung-seg-nlm'}", "--exclude",
                     "*_0.png", "--image-size", "64", "--epochs", "10", "--seed", "42"]):
            raise SystemExit("segment failed")
    if cli.main(["preprocess", "--data-dir", str(SHARED / "cxr-mini"), "--out-dir", str(work / "prepared"),
                 "--lung-model", "models:/cxr-lung-seg/1", "--seed", "42", "--exclude", exclude]):
        raise SystemExit("preprocess failed")
    manifest = pd.read_csv(next((work / "prepared").glob("*/manifest.csv")))
    items = [("mini", r.source, int(r.label), r.split) for r in manifest.itertuples()]
    items += [("hannover", str(p), 1, "ext") for p in files(SHARED / "cxr-external-dev" / "COVID" / "images")]
    items += [("nih", str(p), 0, "ext") for p in files(SHARED / "cxr-external-dev" / "Normal" / "images")]
    items += [("nlm0", str(p), 0, "ext") for p in files(SHARED / "lung-seg-nlm" / "images", "*_0.png")]
    items += [("tb", str(p), 0, "ext") for p in files(SHARED / "lung-seg-nlm" / "images", "*_1.png")]
    items += [("vp", str(p), 0, "ext") for p in files(SHARED / "cxr-masks" / "Viral Pneumonia" / "images")]
    greys = [decode_grey(Path(path).read_bytes()) for _, path, _, _ in items]
    meta = pd.DataFrame(items, columns=["set", "path", "label", "split"])
    with open(work / "films.pkl", "wb") as out:
        pickle.dump((meta, greys), out)


def working_and_masks(work: Path, greys: list[np.ndarray], side: int):
    """The working images and the segmenter's masks for a working size (cached)."""
    path = work / f"masks-{side}.pkl"
    if path.exists():
        with open(path, "rb") as cached:
            return pickle.load(cached)
    from cxrexp.config import ImageSpec
    from cxrexp.lungs.segmenter import predict_masks
    from cxrexp.lungs.view import working_image
    from cxrexp.mlflow_edge.segmenter_serving import load_segmenter

    model, _ = load_segmenter("models:/cxr-lung-seg/1")
    working = [working_image(g, ImageSpec(image_size=side // 2, lungs="none")) for g in greys]
    masks = [m for start in range(0, len(working), 32) for m in predict_masks(model, working[start:start + 32])]
    with open(path, "wb") as out:
        pickle.dump((working, masks), out)
    return working, masks


def views(work: Path, greys: list[np.ndarray], settings: dict[str, str]) -> np.ndarray:
    from cxrexp.config import ImageSpec
    from cxrexp.lungs.view import finish, working_size

    names = {"margin": "lung_margin", "aspect": "lung_aspect", "fill": "lung_fill", "clip": "clip_limit",
             "tiles": "tile_grid", "size": "image_size"}
    spec = ImageSpec(lung_model="models:/cxr-lung-seg/1", **{names.get(k, k): VIEW_KEYS[k](v)
                                                             for k, v in settings.items() if k in VIEW_KEYS})
    working, masks = working_and_masks(work, greys, working_size(spec))
    out = np.empty((len(working), spec.image_size, spec.image_size), np.uint8)
    for i, (image, mask) in enumerate(zip(working, masks)):
        out[i], _ = finish(image, mask, spec)
    return out


def train_config(settings: dict[str, str], seed: int):
    from cxrexp.config import TrainConfig, apply_preset

    cfg = apply_preset(TrainConfig(seed=seed, preset=settings.get("preset", "default")), set())
    numbers = {"dropout": ("dropout", float), "epochs": ("epochs", int), "patience": ("patience", int),
               "lr": ("learning_rate", float), "tspec": ("target_specificity", float)}
    changes = {field: kind(settings[key]) for key, (field, kind) in numbers.items() if key in settings}
    for key, field in (("filters", "filters"), ("dense", "dense")):
        if key in settings:
            changes[field] = tuple(int(v) for v in settings[key].split("-"))
    for key, field in (("bn", "batch_norm"), ("augment", "augment")):
        if key in settings:
            changes[field] = settings[key] == "true"
    if "rule" in settings:
        changes["threshold_rule"] = settings["rule"]
    return replace(cfg, **changes)


def explore(work: Path, name: str, seeds: list[int], settings: dict[str, str]) -> None:
    import keras

    from cxrexp.data.tfdata import predict_probabilities
    from cxrexp.learn.training import train_model

    with open(work / "films.pkl", "rb") as cached:
        meta, greys = pickle.load(cached)
    images = views(work, greys, settings)
    labels = meta["label"].to_numpy(np.int64)
    rows = {split: np.flatnonzero(((meta["set"] == "mini") & (meta["split"] == split)).to_numpy())
            for split in ("train", "val")}
    external = np.flatnonzero((meta["set"] != "mini").to_numpy())
    for seed in seeds:
        started = time.perf_counter()
        keras.backend.clear_session()
        cfg = train_config(settings, seed)
        result = train_model(cfg, images, images.shape[1], rows["train"], labels[rows["train"]], rows["val"],
                             labels[rows["val"]], verbose=0)
        probability = np.full(len(meta), np.nan, np.float32)
        probability[external] = predict_probabilities(result.model, images, external, 64)
        probability[rows["val"]] = result.val_probabilities
        row = record(work, meta, name, seed, settings, probability, result.val_labels, result.val_probabilities,
                     result.threshold, result.epochs_trained, round(time.perf_counter() - started))
        print(line(row), flush=True)


def record(work: Path, meta: pd.DataFrame, name: str, seed: int, settings: dict, probability: np.ndarray,
           val_labels: np.ndarray, val_probability: np.ndarray, threshold: float | None, epochs: int,
           seconds: int) -> dict:
    """One setting's row for one seed (validation AUC, the dev-pairing scores at ``threshold`` and at
    Youden's threshold on the same validation split), appended to ``<work>/explore.csv``; its
    probabilities go to ``<work>/preds/<name>-<seed>.npy``. ``threshold=None``: chosen on the validation
    probabilities by the product's rule (the ``TrainConfig`` defaults), as ``train_model`` does."""
    from cxrexp.config import TrainConfig
    from cxrexp.evaluation.metrics import choose_threshold, roc_auc

    if threshold is None:
        cfg = TrainConfig()
        threshold = choose_threshold(val_labels, val_probability, cfg.threshold_rule, cfg.target_sensitivity,
                                     cfg.target_specificity)
    (work / "preds").mkdir(exist_ok=True)
    np.save(work / "preds" / f"{name}-{seed}.npy", probability)
    youden = choose_threshold(val_labels, val_probability, "youden")
    at_youden = {f"{key}_youden": value for key, value in scores(meta, probability, youden).items()
                 if not key.endswith("_auc")}
    row = {"name": name, "seed": seed, "settings": json.dumps(settings), "threshold": threshold,
           "val_auc": roc_auc(val_labels, val_probability), "epochs": epochs, **scores(meta, probability, threshold),
           "threshold_youden": youden, **at_youden, "seconds": seconds}
    pd.DataFrame([row]).to_csv(work / "explore.csv", mode="a", header=not (work / "explore.csv").exists(), index=False)
    return row


def scores(meta: pd.DataFrame, probability: np.ndarray, threshold: float) -> dict[str, float]:
    from cxrexp.evaluation.metrics import roc_auc

    part = {s: (meta["set"] == s).to_numpy() for s in SETS}
    called = probability >= threshold
    out = {}
    for pairing, normals in (("nih", "nih"), ("other", "nlm0")):
        both = part["hannover"] | part[normals]
        out[f"{pairing}_auc"] = roc_auc(meta["label"][both], probability[both])
        out[f"{pairing}_spec"] = float(1 - called[part[normals]].mean())
    out["sens"] = float(called[part["hannover"]].mean())
    out["vp_called"] = float(called[part["vp"]].mean())
    out["tb_called"] = float(called[part["tb"]].mean())
    return out


def mean_of(work: Path, meta: pd.DataFrame, first: str, second: str) -> None:
    """Score the per-seed mean of two settings' probabilities as a setting of its own (``first+second``)."""
    labels = meta["label"].to_numpy(np.int64)
    val = ((meta["set"] == "mini") & (meta["split"] == "val")).to_numpy()
    rows = pd.read_csv(work / "explore.csv")
    name = f"{first}+{second}"
    done = set(rows.loc[rows["name"] == name, "seed"])
    for seed in sorted(set(rows.loc[rows["name"] == first, "seed"]) & set(rows.loc[rows["name"] == second, "seed"]) - done):
        probability = (np.load(work / "preds" / f"{first}-{seed}.npy") + np.load(work / "preds" / f"{second}-{seed}.npy")) / 2
        record(work, meta, name, seed, {"mean_of": [first, second]}, probability, labels[val], probability[val],
               None, 0, 0)


def paired_report(work: Path, meta: pd.DataFrame, base: str) -> None:
    """Per setting and seed, the AUC difference against ``base`` of the same seed on both dev pairings."""
    from cxrexp.evaluation.metrics import paired_difference

    part = {s: (meta["set"] == s).to_numpy() for s in SETS}
    labels = meta["label"].to_numpy(np.int64)
    rows = pd.read_csv(work / "explore.csv")
    print(f"\n| setting | seed | NIH pairing: AUC difference vs {base} | other-hospital pairing: AUC difference |")
    print("|---|---|---|---|")
    for name, seed in rows.loc[rows["name"] != base, ["name", "seed"]].drop_duplicates().itertuples(index=False):
        base_file, file = work / "preds" / f"{base}-{seed}.npy", work / "preds" / f"{name}-{seed}.npy"
        if not (base_file.exists() and file.exists()):
            continue
        a, b = np.load(base_file), np.load(file)
        cells = []
        for normals in ("nih", "nlm0"):
            both = part["hannover"] | part[normals]
            d = paired_difference(labels[both], a[both], b[both], "roc_auc", n_bootstrap=2000, seed=42)
            cells.append(f"{d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
        print(f"| {name} | {seed} | {cells[0]} | {cells[1]} |")


def line(row: dict) -> str:
    return (f"| {row['name']} | {row['seed']} | {row['val_auc']:.3f} | {row['nih_auc']:.3f} | {row['other_auc']:.3f} | "
            f"{row['sens']:.2f} | {row['nih_spec']:.2f} | {row['other_spec']:.2f} | {row['vp_called']:.2f} | "
            f"{row['tb_called']:.2f} | {row['sens_youden']:.2f} | {row['other_spec_youden']:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="work folder (its cache is reused between calls)")
    parser.add_argument("--name", default="")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--exclude", default="@paediatric-normals", help="preprocess -P exclude for the split")
    parser.add_argument("--report", action="store_true", help="print the table of <work>/explore.csv")
    parser.add_argument("--mean", default="", metavar="A,B",
                        help="with --report: add the per-seed mean of settings A and B as setting A+B")
    parser.add_argument("--paired", default="", metavar="BASE",
                        help="with --report: paired AUC differences of every setting against BASE, seed by seed")
    parser.add_argument("settings", nargs="*", help="key=value settings (see the module docstring)")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    print("| setting | seed | val AUC | NIH AUC | other AUC | sens | NIH spec | other spec | VP called | TB called | "
          "sens (Youden) | other spec (Youden) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    if args.report:
        meta = None
        if args.mean or args.paired:  # the films' table, read once (the pickle also holds every decoded film)
            with open(work / "films.pkl", "rb") as cached:
                meta, _ = pickle.load(cached)
        if args.mean:
            mean_of(work, meta, *args.mean.split(",", 1))
        for row in pd.read_csv(work / "explore.csv").to_dict("records"):
            print(line(row))
        if args.paired:
            paired_report(work, meta, args.paired)
        return 0
    settings = dict(s.split("=", 1) for s in args.settings)
    if unknown := set(settings) - set(VIEW_KEYS) - TRAIN_KEYS:
        raise SystemExit(f"unknown settings {sorted(unknown)}; known: {sorted(set(VIEW_KEYS) | TRAIN_KEYS)}")
    needed = [SHARED / d for d in ("cxr-mini", "cxr-masks", "lung-seg-nlm", "cxr-external-dev")]
    if missing := [str(d) for d in needed if not d.is_dir()]:
        print(f"this benchmark needs the shared data sets; missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    work.mkdir(parents=True, exist_ok=True)
    use_store(work)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not (work / "films.pkl").exists():
        build_cache(work, args.exclude)
    explore(work, args.name or "-".join(args.settings) or "default", [int(s) for s in args.seeds.split(",")], settings)
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
