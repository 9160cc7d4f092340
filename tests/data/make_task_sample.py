"""Recreate the small 2D task sample ``hc18_small/`` (see README.md here) from ``../shared/data2d``.

python tests/data/make_task_sample.py /path/to/shared/data2d

Four HC18 fetal-head ultrasound images and their filled head masks, downsampled 4x (800 x 540 -> 200 x 135, area
averaging for the images, nearest for the masks), and a decathlon-style ``datalist.json`` (2 training, 1 validation,
1 testing image) for configs/train_auto.json.
"""

import json
import sys
from pathlib import Path

from PIL import Image

IMAGES = ["000_HC.png", "050_HC.png", "100_HC.png", "150_HC.png"]
SPLITS = {"training": IMAGES[:2], "validation": IMAGES[2:3], "testing": IMAGES[3:]}
FACTOR = 4


def main(source: Path) -> None:
    out = Path(__file__).resolve().parent / "hc18_small"
    out.mkdir(exist_ok=True)
    for name in IMAGES:
        image = Image.open(source / "hc18_fetal_head_us" / "images" / name).convert("L")
        mask = Image.open(source / "hc18_fetal_head_us" / "masks" / name).convert("L")
        size = (image.width // FACTOR, image.height // FACTOR)
        image.resize(size, Image.Resampling.BOX).save(out / name, optimize=True)
        mask.resize(size, Image.Resampling.NEAREST).save(out / name.replace(".png", "_mask.png"), optimize=True)
    datalist = {
        split: [{"image": n, "label": n.replace(".png", "_mask.png"), "modality": "ultrasound"} for n in names]
        for split, names in SPLITS.items()
    }
    (out / "datalist.json").write_text(json.dumps(datalist, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
