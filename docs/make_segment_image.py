"""The README's segmentation picture: held-out digit scenes, the prediction overlay, the labels.

    python docs/make_segment_image.py RUN_DIR docs/images/segment.png

Runs `swinx segment predict --img-size 416` (whole image) on three validation scenes of the default
digit scenes and lays out, per scene, the input, the overlay and the ground-truth labels in the same
palette, each shown 1.125x.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from swinx.segmentation import scenes

run, out = Path(sys.argv[1]), Path(sys.argv[2])
root = scenes.ensure_scenes(scenes.scenes_dir())
names = ["000003.png", "000010.png", "000021.png"]
images = [root / "images" / "val" / n for n in names]
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run(
        [sys.executable, "-m", "swinx", "segment", "predict", "--checkpoint", str(run), "--img-size", "416",
         "--out", tmp, *map(str, images)],
        check=True,
    )  # fmt: skip
    palette = [v for colour in scenes.PALETTE for v in colour]
    rows = []
    for name, image in zip(names, images):
        label = Image.open(root / "annotations" / "val" / name)
        label.putpalette(palette + [0] * (768 - len(palette)))
        overlay = Image.open(Path(tmp) / (Path(name).stem + "_overlay.png"))
        rows.append([Image.open(image).convert("RGB"), overlay.convert("RGB"), label.convert("RGB")])
    side, gap = 288, 6
    sheet = Image.new("RGB", (3 * side + 2 * gap, len(rows) * side + (len(rows) - 1) * gap), "white")
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            sheet.paste(picture.resize((side, side), Image.NEAREST), (c * (side + gap), r * (side + gap)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
print(out)
