"""What the lung-cropped models still read on the NIH films: the crops' geometry and grey levels, by source.

Run after ``benchmarks/lungs_compare.py`` on the same work folder (it reads that folder's MLflow store
for the segmenter and its ``predictions.csv`` for the served probabilities):

    python benchmarks/nih_crop_reading.py --work /tmp/lc [--mode crop]

For every film of cxr-mini (the training database: COVID and Normal), the Hannover COVID films, the
NIH normals and the Montgomery/Shenzhen normals (``lung-seg-nlm`` ``_0``), it runs the product's own
lung view (``lungs.view``: working image, the registered segmenter, ``lung_view`` with the default
margin and aspect; cxr-mini's normals without ``@paediatric-normals``, as lungs_compare trains) and measures what a crop carries besides the lungs' texture:

- ``lung_area``: the mask's share of the working image; ``box_aspect``: the crop box's height over
  width; ``box_top``: where the box starts, as a share of the image height (a low box_top reaches up
  to the neck and clavicles); ``side_ratio``: the smaller lung's area over the larger one's;
- ``lung_grey`` and ``lung_contrast``: mean and standard deviation of the grey levels inside the
  mask (exposure and processing, which differ by hospital); ``image_aspect`` of the original film.

Printed: the median of each feature per source, then for the external normals (NIH and
Montgomery/Shenzhen together) the Spearman correlation of each feature with the model's COVID
probability (mean over the seeds in ``predictions.csv``), and the medians of the NIH normals the
models call COVID against those they call normal. A feature where the NIH normals sit with the
training COVID films, and that tracks the probability, is a candidate for what the models read.
Nothing here chooses a setting; the external sets are dev pairings.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from common import use_store  # noqa: E402  (benchmarks/common.py)
from lungs_compare import SHARED  # noqa: E402  (the same shared sets, listed the same way)
from lungs_compare import files as image_files  # noqa: E402

FEATURES = ("lung_area", "box_aspect", "box_top", "side_ratio", "lung_grey", "lung_contrast", "image_aspect")


def sources() -> dict[str, list[Path]]:
    """The films by source; cxr-mini's normals without the paediatric ones (as the models were trained)."""
    from cxrexp.data.discovery import excluded_by, expand_exclude

    children = expand_exclude(["@paediatric-normals"])

    def files(folder: Path, pattern: str = "*") -> list[Path]:
        return [p for p in image_files(folder, pattern) if not excluded_by(p.name, children)]

    return {
        "train COVID (cxr-mini)": files(SHARED / "cxr-mini" / "COVID" / "images"),
        "train Normal (cxr-mini, adults)": files(SHARED / "cxr-mini" / "Normal" / "images"),
        "Hannover COVID": files(SHARED / "cxr-external-dev" / "COVID" / "images"),
        "NIH normal": files(SHARED / "cxr-external-dev" / "Normal" / "images"),
        "Montgomery/Shenzhen normal": files(SHARED / "lung-seg-nlm" / "images", "*_0.png"),
    }


def features(grey: np.ndarray, working: np.ndarray, mask: np.ndarray, view) -> dict[str, float]:
    from cxrexp.lungs.masks import largest_components

    _, areas = largest_components(mask)
    y0, y1, x0, x1 = view.box  # half-open, as masks.crop_box returns it
    inside = working[mask]
    return {
        "lung_area": float(mask.mean()),
        "box_aspect": float((y1 - y0) / max(1, x1 - x0)),
        "box_top": float(y0 / working.shape[0]),
        "side_ratio": float(min(areas) / max(areas)) if len(areas) == 2 and max(areas) else np.nan,
        "lung_grey": float(inside.mean()) if inside.size else np.nan,
        "lung_contrast": float(inside.std()) if inside.size else np.nan,
        "image_aspect": float(grey.shape[0] / grey.shape[1]),
        "crop_applied": bool(view.applied),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="the work folder of benchmarks/lungs_compare.py")
    parser.add_argument("--mode", default="crop", help="the lungs_compare mode whose probabilities to read")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    use_store(work)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from scipy.stats import spearmanr

    from cxrexp.config import ImageSpec
    from cxrexp.images import decode
    from cxrexp.lungs import view as lung_view
    from cxrexp.lungs.segmenter import predict_masks
    from cxrexp.mlflow_edge.model_uri import registered_version
    from cxrexp.mlflow_edge.segmenter_serving import load_segmenter

    name, version = registered_version("models:/cxr-lung-seg@champion")
    segmenter, _ = load_segmenter(f"models:/{name}/{version}")
    spec = ImageSpec(lungs="crop", lung_model=f"models:/{name}/{version}")
    rows = []
    for source, paths in sources().items():
        for start in range(0, len(paths), 32):
            chunk = paths[start:start + 32]
            greys, workings = [], []
            for path in chunk:
                try:
                    grey = decode.read_grey(path)
                except decode.ImageRejected as err:
                    print(f"skipped {path}: {err.reason}", file=sys.stderr)
                    continue
                greys.append((path, grey))
                workings.append(lung_view.working_image(grey, spec))
            for (path, grey), working, mask in zip(greys, workings, predict_masks(segmenter, workings)):
                _, view = lung_view.finish(working, mask, spec)
                rows.append({"source": source, "file": str(path), **features(grey, working, mask, view)})
        print(f"{source}: {sum(r['source'] == source for r in rows)} films", flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(work / "crop_features.csv", index=False)

    print(f"\nsegmenter {name} v{version}; lung view: margin {spec.lung_margin}, aspect {spec.lung_aspect}")
    print("\n| source | films | crop applied | " + " | ".join(FEATURES) + " |")
    print("|---|---|---|" + "---|" * len(FEATURES))
    for source, group in frame.groupby("source", sort=False):
        medians = " | ".join(f"{group[f].median():.3f}" for f in FEATURES)
        print(f"| {source} | {len(group)} | {group['crop_applied'].mean():.2f} | {medians} |")

    predictions = pd.read_csv(work / "predictions.csv")
    scored = predictions[(predictions["mode"] == args.mode) & predictions["set"].isin(["nih", "other"])]
    probability = scored.groupby("file")["probability"].mean().rename("probability")
    called = scored.groupby("file")["called_covid"].mean().rename("called_share")
    seeds = sorted(scored["seed"].unique())
    merged = frame.merge(probability, left_on="file", right_index=True).merge(called, left_on="file", right_index=True)
    normals = merged[merged["source"].isin(["NIH normal", "Montgomery/Shenzhen normal"])]
    print(f"\nExternal normals ({len(normals)}): Spearman correlation of each feature with the COVID probability "
          f"of lungs={args.mode} (mean over seeds {', '.join(map(str, seeds))})")
    print("| feature | rho | p |\n|---|---|---|")
    for feature in FEATURES:
        part = normals[[feature, "probability"]].dropna()
        if part[feature].nunique() < 2:  # e.g. every film square
            print(f"| {feature} | constant | |")
            continue
        rho, p = spearmanr(part[feature], part["probability"])
        print(f"| {feature} | {rho:+.2f} | {p:.3g} |")
    nih = merged[merged["source"] == "NIH normal"]
    covid_called = nih[nih["called_share"] >= 0.5]
    normal_called = nih[nih["called_share"] < 0.5]
    print(f"\nNIH normals called COVID by most seeds ({len(covid_called)}) vs the rest ({len(normal_called)}): medians")
    print("| feature | called COVID | called normal |\n|---|---|---|")
    for feature in FEATURES:
        print(f"| {feature} | {covid_called[feature].median():.3f} | {normal_called[feature].median():.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
