"""Recreate the cropped test fixtures from the pyradiomics test data (see README.md here).

python tests/data/make_crops.py /path/to/shared/data
"""

import os
import sys

import itk
import numpy as np

# case: (start, size) as ITK indices (x, y, z), around the lesion
CROPS = {
    "lung1": ((170, 312, 30), (96, 96, 8)),
    "breast1": ((0, 40, 6), (45, 64, 8)),
}


def crop(image, start, size):
    region = itk.ImageRegion[3]()
    region.SetIndex([int(v) for v in start])
    region.SetSize([int(v) for v in size])
    return itk.region_of_interest_image_filter(image, region_of_interest=region)


def main(source: str) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for case, (start, size) in CROPS.items():
        image = crop(itk.imread(os.path.join(source, f"{case}_image.nrrd")), start, size)
        label = crop(itk.imread(os.path.join(source, f"{case}_label.nrrd")), start, size)
        label_u8 = itk.image_from_array(itk.array_from_image(label).astype(np.uint8))
        label_u8.CopyInformation(label)
        itk.imwrite(image, os.path.join(here, f"{case}_crop_image.nrrd"), compression=True)
        itk.imwrite(label_u8, os.path.join(here, f"{case}_crop_label.nrrd"), compression=True)


if __name__ == "__main__":
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")
    main(sys.argv[1] if len(sys.argv) > 1 else default)
