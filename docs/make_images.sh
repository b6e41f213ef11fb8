#!/usr/bin/env bash
# Regenerate the README pictures in docs/images/ with `swinx viz`.
#
#   docs/make_images.sh                    # trains the MNIST model first (about 3.5 minutes on 2 CPU cores)
#   RUN=runs/mnist-... docs/make_images.sh # reuse a finished `swinx train` run directory
#
# windows.png and mask.png need no weights (geometry only); attention.png and bias.png use a
# small Swin trained on the built-in MNIST digits for 30 epochs (96.1% held-out top-1 when
# these pictures were made; 8 epochs reach only about 82% and its maps are less clear).
set -euo pipefail
cd "$(dirname "$0")/.."
SWINX=${SWINX:-.venv/bin/swinx}
PYTHON=${PYTHON:-.venv/bin/python}
WORK=${WORK:-/tmp/swinx-make-images}
RUN=${RUN:-$WORK/mnist-run}
OUT=docs/images
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK" "$OUT"

# The inputs: skimage's chelsea (300x451 RGB, not a multiple of any window) and held-out digit 900 (a 9).
"$PYTHON" - "$WORK" <<'EOF'
import sys
from pathlib import Path

from PIL import Image
from skimage.data import chelsea

from swinx.classification.data import mnist5k

work = Path(sys.argv[1])
Image.fromarray(chelsea()).save(work / "chelsea.png")
_, val, _ = mnist5k()
image, label = val[900]
assert label == 9
Image.fromarray(image[0].numpy()).save(work / "digit9.png")
EOF

if [ ! -f "$RUN/best.safetensors" ]; then
    "$SWINX" train --epochs 30 --out "$RUN" --progress off
fi

"$SWINX" viz windows "$WORK/chelsea.png" --model swin_t --dpi 105 --out "$OUT/windows.png"
"$SWINX" viz mask --model swin_t --size 300 451 --stage 2 --out "$OUT/mask.png"
"$SWINX" viz attention --checkpoint "$RUN" "$WORK/digit9.png" --stage 1 --block 1 --query 11 6 \
    --out "$OUT/attention.png"
"$SWINX" viz bias --checkpoint "$RUN" --stage 2 --block 1 --out "$OUT/bias.png"
"$SWINX" viz model swin_t --size 224 224 --out "$OUT/model.png"
ls -l "$OUT"
