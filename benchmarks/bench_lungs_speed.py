"""What a lung view costs: preprocess throughput and served latency, lungs=crop against lungs=none.

Run from the project root (needs ../shared/data/cxr-mini and ../shared/data/cxr-masks):

    python benchmarks/bench_lungs_speed.py [--seg-size 64] [--seg-epochs 3] [--seg-conv standard] [--requests 40] [--rounds 2] [--copies 1,2]

1. **Preprocess throughput** (images/s) of ``cxrexp preprocess`` on cxr-mini (1,200 images, the
   default workers and image size) with ``--lungs crop`` against the named baseline ``--lungs none``:
   the same files, decoding, CLAHE and store writing; crop adds the working-size shrink, the U-Net's
   forward pass in the parent process and the crop. Each setting runs ``--rounds`` times into fresh
   folders, alternating, best round kept; the issue's target is a ratio of at least 0.5. With
   ``--copies 1,2`` each setting also runs on a tree of links holding every cxr-mini file twice
   (under other names; nothing is copied), and the **marginal** throughput (the extra images over
   the extra seconds) is printed beside the whole-run one: a whole run of 1,200 images includes
   fixed costs (TensorFlow's import and the segmenter's load for ``crop``) that a large dataset
   pays once.
2. **Served latency** (ms per single-image request, median and p95) of the pyfunc model in-process
   (``model.predict`` on one raw PNG, as ``mlflow models serve`` calls it) with the segmenter inside
   against the same classifier without it (baseline). The classifier is an untrained ``build_cnn`` with
   the train defaults: latency does not depend on weights.

The segmenter is trained here through the product's ``segment`` step (a few epochs at ``--seg-size``
on cxr-masks: its cost per image depends on its size, not on how well it was trained). Both parts run
in one process, one after the other, on whatever else the machine runs: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import CXR_MINI, PROJECT_ROOT, has_cxr_mini, load_average, use_store  # noqa: E402  (benchmarks/common.py)

MASKS = PROJECT_ROOT.parent / "shared" / "data" / "cxr-masks"
# More fallbacks than this and the crop side does not do a crop's work: the run stops.
MAX_FALLBACK_SHARE = 0.05


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def fallback_share(out: Path) -> float:
    """Share of the prepared images in ``out`` whose lung crop fell back to the whole image."""
    from cxrexp.data.store import open_prepared

    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return float(1.0 - open_prepared(folder).manifest["lung_crop"].mean())


def linked_copies(source: Path, target: Path, k: int) -> Path:
    """``source`` itself for k=1, else a tree of symlinks holding each of its images ``k`` times."""
    if k == 1:
        return source
    for path in sorted(source.glob("*/images/*")):
        folder = target / path.parent.relative_to(source)
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(k):
            (folder / f"{path.stem}__copy{copy}{path.suffix}").symlink_to(path)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seg-size", type=int, default=64)
    parser.add_argument("--seg-epochs", type=int, default=3)
    parser.add_argument("--seg-conv", default="standard", help="the segmenter's convolutions: standard or separable")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--copies", default="1", help="comma-separated: also time a link tree with each file k times")
    args = parser.parse_args()
    if not has_cxr_mini(CXR_MINI) or not MASKS.is_dir():
        print(f"needs {CXR_MINI} and {MASKS}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-lungs-speed-"))
    use_store(work)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print(f"work folder {work}; load average at start: {load_average()}")
    import mlflow
    import numpy as np
    import pandas as pd

    from cxrexp import cli

    if cli.main(["segment", "--mask-dirs", str(MASKS), "--image-size", str(args.seg_size),
                 "--epochs", str(args.seg_epochs), "--conv", args.seg_conv]):
        return 1

    # 1. Preprocess throughput, alternating settings, fresh output folders (no cache hit).
    copies = [int(k) for k in args.copies.split(",")]
    sources = {k: linked_copies(CXR_MINI, work / f"links-{k}", k) for k in copies}
    n_files = len(list(CXR_MINI.glob("*/images/*")))
    best: dict[tuple[str, int], float] = {}  # (lungs, copies) -> best wall seconds
    for round_ in range(args.rounds):
        for k in copies:
            for lungs in (("none", "crop") if round_ % 2 == 0 else ("crop", "none")):
                out = work / f"prepared-{lungs}-{k}-{round_}"
                start = time.perf_counter()
                # every file (no --exclude default): n_files counts them all, and link-tree names differ
                if cli.main(["preprocess", "--data-dir", str(sources[k]), "--out-dir", str(out), "--lungs", lungs,
                             "--exclude", ""]):
                    return 1
                seconds = time.perf_counter() - start
                if lungs == "crop" and (fell_back := fallback_share(out)) > MAX_FALLBACK_SHARE:
                    # A segmenter that finds no lungs makes every image a fallback: the run skips the
                    # crop and times less work than a crop (seen with 3 epochs of separable convolutions).
                    print(f"{fell_back:.0%} of the crops fell back to the whole image (at most "
                          f"{MAX_FALLBACK_SHARE:.0%} allowed): train the segmenter longer (--seg-epochs)", file=sys.stderr)
                    return 1
                best[lungs, k] = min(best.get((lungs, k), float("inf")), seconds)
                print(f"preprocess lungs={lungs} x{k} round {round_ + 1}: {n_files * k / seconds:.1f} images/s "
                      f"(load {load_average()})")

    # 2. Served latency: the same untrained classifier with and without the segmenter inside.
    from cxrexp.config import ImageSpec, TrainConfig
    from cxrexp.learn.model import build_cnn
    from cxrexp.mlflow_edge.segmenter_serving import load_segmenter
    from cxrexp.mlflow_edge.serving import load_pyfunc, log_raw_image_model

    segmenter, _ = load_segmenter("models:/cxr-lung-seg/1")
    cfg = TrainConfig()
    spec = ImageSpec()
    files = sorted((CXR_MINI / "Normal" / "images").glob("*.png"))[: args.requests]
    latency: dict[str, list[float]] = {}
    for lungs in ("none", "crop"):
        model_spec = ImageSpec(lungs=lungs, lung_model="models:/cxr-lung-seg/1" if lungs != "none" else "")
        with mlflow.start_run(run_name=f"bench-lungs-{lungs}"):
            info = log_raw_image_model(build_cnn(spec.image_size, cfg.filters, cfg.dense, cfg.dropout, cfg.seed),
                                       model_spec, 0.5, keras_flavour_name=None,
                                       segmenter=segmenter if lungs != "none" else None)
        model = load_pyfunc(info.model_uri)
        model.predict(pd.DataFrame({"image": [files[0].read_bytes()]}))  # warm-up: graph tracing
        times = []
        for path in files:
            frame = pd.DataFrame({"image": [path.read_bytes()]})
            start = time.perf_counter()
            model.predict(frame)
            times.append(1000 * (time.perf_counter() - start))
        latency[lungs] = times

    print(f"\nload average at the end: {load_average()}")
    print("| measure | lungs=none (baseline) | lungs=crop | ratio |")
    print("|---|---|---|---|")
    rate = {key: n_files * key[1] / seconds for key, seconds in best.items()}
    for k in copies:
        print(f"| preprocess of {n_files * k} images, images/s (best of {args.rounds}) | {rate['none', k]:.1f} | "
              f"{rate['crop', k]:.1f} | {rate['crop', k] / rate['none', k]:.2f}x throughput |")
    if len(copies) > 1:
        low, high = min(copies), max(copies)
        marginal = {lungs: n_files * (high - low) / (best[lungs, high] - best[lungs, low]) for lungs in ("none", "crop")}
        print(f"| preprocess, marginal images/s ({n_files * low} -> {n_files * high} images) | {marginal['none']:.1f} | "
              f"{marginal['crop']:.1f} | {marginal['crop'] / marginal['none']:.2f}x throughput |")
    med = {k: statistics.median(v) for k, v in latency.items()}
    p95 = {k: percentile(v, 95) for k, v in latency.items()}
    print(f"| served request, ms (median of {len(files)}) | {med['none']:.1f} | {med['crop']:.1f} | "
          f"{med['crop'] / med['none']:.2f}x latency |")
    print(f"| served request, ms (p95) | {p95['none']:.1f} | {p95['crop']:.1f} | {p95['crop'] / p95['none']:.2f}x |")
    print(f"segmenter {args.seg_size} px, {args.seg_conv} convolutions; classifier {spec.image_size} px, untrained build_cnn (train defaults); "
          f"{np.mean([p.stat().st_size for p in files]) / 1024:.0f} KiB PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
