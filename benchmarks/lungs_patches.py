"""Screen a patch classifier inside the lung fields: does evidence from lung texture alone generalise?

Run from the project root after ``lungs_explore.py`` has built its cache in the same work folder:

    python benchmarks/lungs_patches.py --work /tmp/lx --seeds 42,1,2 [--view 256] [--patch 64] [--train-patches 8]

Why: the default lung view (crop, CLAHE clip 40, stretch) still lets a whole-view CNN read the size and
shape of the lung fields (docs/lungs.md, "What the crops still carry"), and its Grad-CAM evidence sits on
the lungs no more than chance (audit lift 0.73-1.00). Oh, Park & Ye (IEEE TMI 2020, "Deep learning COVID-19
features on CXR using limited training data sets") classify random patches whose centres lie inside the
segmented lungs and average over many patches per film, so no single input shows the lung outline. This
screen does that with the product's own pieces, outside the product: the lung view of ``lungs.view.finish``
at ``--view`` px and its segmenter mask cut the same way (``view_mask``); ``--train-patches`` random
``--patch`` px patches per training and validation film, centred on mask pixels (fresh per seed); the
product's CNN and training loop (``learn.training.train_model``, ``TrainConfig`` defaults, early stopping
on the patches' validation AUC); a film's probability is the mean over ``--test-patches`` patches drawn the
same way. The threshold is chosen on the validation films' means by the product's rule (95%
specificity). Validation and the dev pairings only (never the internal test split); rows are appended
to ``<work>/explore.csv`` under the name ``patches-<view>-<patch>`` so ``lungs_explore.py --report
--paired default`` compares them with the whole-view default of the same seeds and segmenter.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from common import load_average, use_store  # noqa: E402  (benchmarks/common.py)
from lungs_explore import line, record, working_and_masks  # noqa: E402  (the same cache and table)


def views_and_masks(work: Path, greys: list[np.ndarray], view: int) -> tuple[np.ndarray, np.ndarray]:
    """The default lung view at ``view`` px and its segmenter mask cut the same way (cached)."""
    path = work / f"views-masks-{view}.pkl"
    if path.exists():
        with open(path, "rb") as cached:
            return pickle.load(cached)
    from cxrexp.config import ImageSpec
    from cxrexp.lungs.view import finish, view_mask, working_size

    spec = ImageSpec(lung_model="models:/cxr-lung-seg/1", image_size=view)
    working, masks = working_and_masks(work, greys, working_size(spec))
    images = np.empty((len(working), view, view), np.uint8)
    cut = np.empty((len(working), view, view), np.uint8)
    for i, (image, mask) in enumerate(zip(working, masks)):
        images[i], lung_view = finish(image, mask, spec)
        cut[i] = view_mask(mask, lung_view, spec)
    with open(path, "wb") as out:
        pickle.dump((images, cut), out)
    return images, cut


def patches(images: np.ndarray, masks: np.ndarray, films: np.ndarray, per_film: int, size: int,
            rng: np.random.Generator) -> np.ndarray:
    """uint8 (len(films) * per_film, size, size): for each film in order, ``per_film`` patches whose
    centres are drawn uniformly from its lung-mask pixels (the whole image when the mask is empty),
    shifted inwards where a patch would leave the image."""
    side = images.shape[1]
    half = size // 2
    out = np.empty((len(films) * per_film, size, size), np.uint8)
    for n, film in enumerate(films):
        ys, xs = np.nonzero(masks[film])
        if len(ys) == 0:
            ys, xs = np.mgrid[0:side, 0:side].reshape(2, -1)
        picks = rng.integers(0, len(ys), per_film)
        for k, pick in enumerate(picks):
            top = int(np.clip(ys[pick] - half, 0, side - size))
            left = int(np.clip(xs[pick] - half, 0, side - size))
            out[n * per_film + k] = images[film, top:top + size, left:left + size]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="lungs_explore.py's work folder (its cache)")
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--view", type=int, default=256, help="lung view side, px")
    parser.add_argument("--patch", type=int, default=64, help="patch side, px")
    parser.add_argument("--train-patches", type=int, default=8, help="patches per training/validation film")
    parser.add_argument("--test-patches", type=int, default=16, help="patches averaged per scored film")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if not (work / "films.pkl").exists():
        print(f"no cache in {work}: run benchmarks/lungs_explore.py --work {work} first", file=sys.stderr)
        return 1
    use_store(work)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from cxrexp.config import TrainConfig
    from cxrexp.data.tfdata import predict_probabilities
    from cxrexp.learn.training import train_model

    with open(work / "films.pkl", "rb") as cached:
        meta, greys = pickle.load(cached)
    images, masks = views_and_masks(work, greys, args.view)
    labels = meta["label"].to_numpy(np.int64)
    films = {split: np.flatnonzero(((meta["set"] == "mini") & (meta["split"] == split)).to_numpy())
             for split in ("train", "val")}
    scored = np.flatnonzero(((meta["set"] != "mini") | (meta["split"] == "val")).to_numpy())
    name = f"patches-{args.view}-{args.patch}"
    print("| setting | seed | val AUC | NIH AUC | other AUC | sens | NIH spec | other spec | VP called | TB called | "
          "sens (Youden) | other spec (Youden) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        started = time.perf_counter()
        keras.backend.clear_session()
        rng = np.random.default_rng(seed)
        train_x = patches(images, masks, films["train"], args.train_patches, args.patch, rng)
        val_x = patches(images, masks, films["val"], args.train_patches, args.patch, rng)
        pool = np.concatenate([train_x, val_x])
        n_train = len(train_x)
        cfg = TrainConfig(seed=seed)
        result = train_model(cfg, pool, args.patch, np.arange(n_train), np.repeat(labels[films["train"]], args.train_patches),
                             np.arange(n_train, len(pool)), np.repeat(labels[films["val"]], args.train_patches), verbose=0)
        test_x = patches(images, masks, scored, args.test_patches, args.patch, np.random.default_rng(seed + 1000))
        per_patch = predict_probabilities(result.model, test_x, np.arange(len(test_x)), 256)
        probability = np.full(len(meta), np.nan, np.float32)
        probability[scored] = per_patch.reshape(len(scored), args.test_patches).mean(axis=1)
        row = record(work, meta, name, seed, vars(args) | {"work": str(work)}, probability, labels[films["val"]],
                     probability[films["val"]], None, result.epochs_trained, round(time.perf_counter() - started))
        print(line(row), flush=True)
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
