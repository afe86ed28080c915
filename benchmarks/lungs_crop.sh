#!/usr/bin/env bash
# lungs=none vs lungs=crop on cxr-mini, one seed, both external pairings (docs/lungs.md, "Lung-cropped
# classifier"). The segmenter is trained on cxr-masks + the lung-seg-nlm tuberculosis films only: the
# lung-seg-nlm normals (_0) are the external normals and stay out of it.
# Usage: bash benchmarks/lungs_crop.sh [SEG_IMAGE_SIZE] [SEG_EPOCHS] [SEED]   (from the project root)
set -euo pipefail
SEG_SIZE=${1:-64}; SEG_EPOCHS=${2:-10}; SEED=${3:-42}
SHARED="$(cd "$(dirname "$0")/../.." && pwd)/shared/data"
W=$(mktemp -d); cd "$W"; echo "work folder: $W"
mkdir -p ext-other/COVID ext-other/Normal   # Hannover COVID + lung-seg-nlm normals, as links
ln -s "$SHARED"/cxr-external-dev/COVID/images/* ext-other/COVID/
ln -s "$SHARED"/lung-seg-nlm/images/*_0.png ext-other/Normal/
export MLFLOW_TRACKING_URI=sqlite:///$W/mlflow.db TF_CPP_MIN_LOG_LEVEL=3
cxrexp segment --mask-dirs "$SHARED"/cxr-masks,"$SHARED"/lung-seg-nlm --exclude '*_0.png' \
  --image-size "$SEG_SIZE" --epochs "$SEG_EPOCHS" --seed "$SEED" 2>&1 | grep -v "^Epoch\|step -"
for LUNGS in crop none; do
  cxrexp preprocess --data-dir "$SHARED"/cxr-mini --out-dir $W/prepared-$LUNGS --lungs $LUNGS --seed "$SEED" | tail -6
  DATA=$(ls -d $W/prepared-$LUNGS/data-*)
  cxrexp train --data "$DATA" --seed "$SEED" --registered-model-name mini-$LUNGS | tail -2
  cxrexp evaluate --model-uri models:/mini-$LUNGS@challenger --external "$SHARED"/cxr-external-dev,"$W"/ext-other \
    --external-out-dir $W/ext-prepared-$LUNGS 2>&1 | grep -iE "roc|spec|sens|external|audit|lung" | tail -25
done
