"""The lung segmenter on the shared mask sets: held-out Dice per source, and inference cost per image.

Run from the project root (needs ../shared/data/cxr-masks and ../shared/data/lung-seg-nlm):

    python benchmarks/bench_segmenter.py [--image-size 128] [--epochs 15] [--seed 42]

Trains through the product's own segment run (``mlflow_edge.segmenter_run``, a temporary MLflow
store) on cxr-masks (600 paediatric Viral Pneumonia films, the database's own 256 px masks) and the
lung-seg-nlm tuberculosis films (``_1``); the lung-seg-nlm normals (``_0``) are left out of training
(``exclude=*_0.png``) because the classifier uses them as external normals. Prints:

- the run's held-out test split Dice and IoU, overall and per source (Viral Pneumonia, montgomery,
  shenzhen), masks predicted at the model's size and scored at each image's own size;
- Dice on the 142 ``_0`` normals (never seen in training: a second held-out set from both NLM hospitals);
- inference cost: ms per image of ``predict_masks`` (decode excluded, resize and threshold included)
  against the classifier CNN's forward pass at the same size (the named baseline: the default
  architecture, ``learn.model.build_cnn``), batch 16, best of 3 over 64 images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import PROJECT_ROOT, load_average, use_store  # noqa: E402  (benchmarks/common.py)

SHARED = PROJECT_ROOT.parent / "shared" / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--conv", default="standard", help="standard or separable (SegmentConfig.conv)")
    args = parser.parse_args()
    sets = [SHARED / "cxr-masks", SHARED / "lung-seg-nlm"]
    missing = [str(s) for s in sets if not s.is_dir()]
    if missing:
        print(f"mask sets not found: {missing} (../shared/data beside the project)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-segmenter-") as tmp:
        use_store(Path(tmp))
        import mlflow

        from cxrexp.config import SegmentConfig, TrainConfig
        from cxrexp.data.mask_pairs import find_mask_pairs
        from cxrexp.images.decode import read_grey
        from cxrexp.learn.model import build_cnn_from_config
        from cxrexp.lungs.masks import dice, mask_for_image
        from cxrexp.lungs.segmenter import predict_masks, to_input
        from cxrexp.mlflow_edge import segmenter_run
        from cxrexp.mlflow_edge.segmenter_serving import load_segmenter

        cfg = SegmentConfig(mask_dirs=tuple(map(str, sets)), exclude=("*_0.png",), image_size=args.image_size,
                            epochs=args.epochs, seed=args.seed, base_filters=args.base_filters, conv=args.conv,
                            registered_model_name="bench-lung-seg")
        print(f"load average {load_average()}; training on {[s.name for s in sets]} (exclude *_0.png), "
              f"{args.image_size} px, {args.epochs} epochs, seed {args.seed}, {args.conv} convolutions, "
              f"base {args.base_filters} filters")
        started = time.perf_counter()
        run_id = segmenter_run.run(cfg)
        train_s = time.perf_counter() - started
        metrics = mlflow.get_run(run_id).data.metrics
        print(f"segment run: {train_s / 60:.1f} min; held-out test split (n={int(metrics['n_test'])}): "
              f"Dice {metrics['test_dice']:.4f}, IoU {metrics['test_iou']:.4f}")
        for key in sorted(k for k in metrics if k.startswith("test_dice_")):
            source = key[len("test_dice_"):]
            print(f"  {source}: Dice {metrics[key]:.4f}, IoU {metrics['test_iou_' + source]:.4f} "
                  f"(n={int(metrics['n_test_' + source])})")
        model, _ = load_segmenter("models:/bench-lung-seg@champion")
        normals = find_mask_pairs([str(SHARED / "lung-seg-nlm")], exclude=("*_1.png",)).pairs
        images = [read_grey(p.image) for p in normals]
        truths = [mask_for_image(read_grey(p.mask, min_side=1), im.shape) for im, p in zip(images, normals)]
        predicted = predict_masks(model, images)
        by_source: dict[str, list[float]] = {}
        for pair, p, t in zip(normals, predicted, truths):
            by_source.setdefault(pair.source, []).append(dice(p, t))
        print(f"lung-seg-nlm normals (_0, never trained on, n={len(normals)}): Dice "
              f"{np.mean([d for v in by_source.values() for d in v]):.4f}; "
              + ", ".join(f"{s} {np.mean(v):.4f} (n={len(v)})" for s, v in sorted(by_source.items())))
        sample = images[:64]
        baseline = build_cnn_from_config(TrainConfig(), args.image_size)
        batch = to_input(sample, args.image_size)

        def timed(fn) -> float:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            return best * 1000 / len(sample)

        seg_ms = timed(lambda: predict_masks(model, sample))
        cnn_ms = timed(lambda: [baseline.predict_on_batch(batch[i:i + 16]) for i in range(0, len(batch), 16)])
        print(f"inference: segmenter {seg_ms:.1f} ms/image vs the default classifier CNN {cnn_ms:.1f} ms/image "
              f"at {args.image_size} px: ratio {seg_ms / cnn_ms:.1f}x (2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
