#!/usr/bin/env bash
# The default recipe before the lung-field defaults (2026-12-06: whole images, CLAHE clip 2, every file, Youden's
# threshold) trained on cxr-mini, scored on both external pairings (the figures in docs/evaluate.md, "External
# collections"). Today's default needs a segmenter: benchmarks/lungs_compare.py measures it.
# Run from the project root with ../shared/data beside it; everything goes to a temporary folder.
set -euo pipefail
SHARED="$(cd "$(dirname "$0")/../.." && pwd)/shared/data"
W=$(mktemp -d); cd "$W"
mkdir -p ext-other/COVID ext-other/Normal   # Hannover COVID + lung-seg-nlm normals, as links
ln -s "$SHARED"/cxr-external-dev/COVID/images/* ext-other/COVID/
ln -s "$SHARED"/lung-seg-nlm/images/*_0.png ext-other/Normal/
export MLFLOW_TRACKING_URI=sqlite:///$W/mlflow.db TF_CPP_MIN_LOG_LEVEL=3
cxrexp preprocess --data-dir "$SHARED"/cxr-mini --out-dir $W/prepared --lungs none --clip-limit 2.0 --exclude ""
DATA=$(ls -d $W/prepared/data-*)
cxrexp train --data "$DATA" --registered-model-name mini-default --threshold-rule youden
cxrexp evaluate --model-uri models:/mini-default@challenger --external "$SHARED"/cxr-external-dev,"$W"/ext-other --external-out-dir $W/ext-prepared
