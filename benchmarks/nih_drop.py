"""Why lung crops lose on NIH normals: score the external films as they are and as the database stores them.

Run from the project root, on the work folder of a ``lungs_compare.py`` run (its MLflow store holds the
registered ``mini-<mode>`` models):

    python benchmarks/lungs_compare.py --modes none,crop --seeds 42 --work /tmp/lungs-work
    python benchmarks/nih_drop.py --work /tmp/lungs-work [--modes none,crop] [--size 299] [--retrain-adult]

The hypothesis: the database's images were downsampled to 299 x 299 and re-encoded as PNG before
anyone trained on them, while the external films in ``../shared/data`` are full resolution. An
uncropped model resizes the whole film to 128 px either way; a lung crop of a 299 px image is
resized *up* or barely down, while a crop of a 1024+ px film is resized down several fold, so
sharpness and noise inside the crop differ by source. If that is what the crop models read, scoring
the same external films after the database's own treatment (INTER_AREA to ``--size`` px, PNG)
should bring their AUC back. Every model is asked as served (the pyfunc model on raw file bytes).
Printed per model and pairing: ROC-AUC and specificity at the model's own threshold, as the files
are and after the treatment. With ``--retrain-adult`` the same models are first trained again without
cxr-mini's paediatric normals (Normal-63 .. Normal-1403 of the database come from a children's
hospital): a second hypothesis, that a lung crop leaves "child-sized lungs = normal" as the easiest
cue, which adult NIH normals do not have. Dev pairings only; no test split is read, nothing is
chosen here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from common import load_average, use_store  # noqa: E402  (benchmarks/common.py)
from lungs_compare import collections, served_probabilities  # noqa: E402


def as_the_database_stores_them(paths: list[Path], folder: Path, size: int) -> list[Path]:
    """Each file decoded to grey, resized with INTER_AREA to size x size, written as PNG in ``folder``."""
    from cxrexp.images.decode import read_grey

    out = []
    for i, path in enumerate(paths):
        grey = read_grey(path)
        small = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)
        target = folder / f"{i:05d}-{path.stem}.png"
        cv2.imwrite(str(target), small)
        out.append(target)
    return out


def retrain_adult_only(work: Path, modes: list[str], seeds: list[int]) -> None:
    """preprocess + train (each seed, defaults) per mode on cxr-mini without its paediatric normals
    (``-P exclude=@paediatric-normals``), registered as ``mini-<mode>-adult`` in the same store (the
    crop uses the store's ``cxr-lung-seg``)."""
    import mlflow
    from lungs_compare import SHARED

    from cxrexp import cli

    for mode in modes:
        out = work / f"prepared-{mode}-adult"
        if cli.main(["preprocess", "--data-dir", str(SHARED / "cxr-mini"), "--exclude", "@paediatric-normals",
                     "--out-dir", str(out), "--lungs", mode, "--seed", "42"]):
            raise SystemExit(1)
        pre = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                                 filter_string="tags.`cxrexp.step` = 'preprocess'",
                                 order_by=["attributes.start_time DESC"])[0]
        for seed in seeds:
            if cli.main(["train", "--data", pre.info.run_id, "--seed", str(seed), "--registered-model-name",
                         f"mini-{mode}-adult"]):
                raise SystemExit(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a lungs_compare.py work folder")
    parser.add_argument("--modes", default="none,crop")
    parser.add_argument("--size", type=int, default=299, help="the database's stored size")
    parser.add_argument("--seeds", default="42", help="training seeds for --retrain-adult")
    parser.add_argument("--retrain-adult", action="store_true",
                        help="first train mini-<mode>-adult on cxr-mini without its paediatric normals, then score those too")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    use_store(work)
    import mlflow

    from cxrexp.evaluation.metrics import roc_auc

    client = mlflow.MlflowClient()
    modes = args.modes.split(",")
    if args.retrain_adult:
        retrain_adult_only(work, [m for m in modes if not m.endswith("-adult")], [int(v) for v in args.seeds.split(",")])
        modes += [f"{m}-adult" for m in modes]
    sets = {name: items for name, items in collections().items() if name in ("nih", "other")}
    print(f"load average at start: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nih-drop-") as tmp:
        treated = {}
        for name, items in sets.items():
            folder = Path(tmp) / name
            folder.mkdir()
            treated[name] = as_the_database_stores_them([p for p, _ in items], folder, args.size)
        print("\n| model | seed | pairing | AUC as filed | spec as filed | AUC at the database's size | spec |")
        print("|---|---|---|---|---|---|---|")
        for mode in modes:
            for version in client.search_model_versions(f"name='mini-{mode}'"):
                uri = f"models:/mini-{mode}/{version.version}"
                seed = client.get_run(version.run_id).data.params.get("seed", "?")
                for name, items in sets.items():
                    labels = np.array([lab for _, lab in items])
                    cells = []
                    for paths in ([p for p, _ in items], treated[name]):
                        probability, called = served_probabilities(uri, paths)
                        kept = ~np.isnan(probability)
                        cells += [f"{roc_auc(labels[kept], probability[kept]):.3f}",
                                  f"{1 - called[kept & (labels == 0)].mean():.2f}"]
                    print(f"| {uri} | {seed} | {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nload average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
