"""Recreate the cropped test fixtures from the pyradiomics test data (see README.md here).

python tests/data/make_crops.py /path/to/shared/data [CASE ...]
"""

import os
import sys

import itk
import numpy as np

# case: (start, size) as ITK indices (x, y, z), around the lesion
CROPS = {
    "lung1": ((170, 312, 30), (96, 96, 8)),
    "breast1": ((0, 40, 6), (45, 64, 8)),
    "brain1": ((150, 76, 10), (72, 88, 9)),
}


def crop(image, start, size):
    region = itk.ImageRegion[3]()
    region.SetIndex([int(v) for v in start])
    region.SetSize([int(v) for v in size])
    return itk.region_of_interest_image_filter(image, region_of_interest=region)


def objects_label(image, label):
    """Two labels on the lung1 crop: 1 the tumour, 2 the bone at the crop's corner (HU > 150 on slices 2-4, the
    largest component, holes filled per slice): a two-object ground truth for the label-map evaluation."""
    from scipy import ndimage

    hu = itk.array_from_image(image).transpose(2, 1, 0)  # x, y, z
    tumour = itk.array_from_image(label).transpose(2, 1, 0) > 0
    region = np.zeros(hu.shape, bool)
    region[60:, 50:, 2:5] = True
    components, _ = ndimage.label((hu > 150) & region)
    bone = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    bone = np.stack([ndimage.binary_fill_holes(bone[..., k]) for k in range(bone.shape[-1])], -1) & ~tumour
    labels = (tumour * 1 + bone * 2).astype(np.uint8)
    out = itk.image_from_array(np.ascontiguousarray(labels.transpose(2, 1, 0)))
    out.CopyInformation(label)
    return out


def main(source: str, cases=None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for case, (start, size) in CROPS.items():
        if cases and case not in cases:
            continue
        image = crop(itk.imread(os.path.join(source, f"{case}_image.nrrd")), start, size)
        label = crop(itk.imread(os.path.join(source, f"{case}_label.nrrd"), itk.UC), start, size)
        label_u8 = itk.image_from_array(itk.array_from_image(label).astype(np.uint8))
        label_u8.CopyInformation(label)
        itk.imwrite(image, os.path.join(here, f"{case}_crop_image.nrrd"), compression=True)
        itk.imwrite(label_u8, os.path.join(here, f"{case}_crop_label.nrrd"), compression=True)
        if case == "lung1":
            objects = objects_label(image, label_u8)
            itk.imwrite(objects, os.path.join(here, f"{case}_crop_objects_label.nrrd"), compression=True)


if __name__ == "__main__":
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")
    main(sys.argv[1] if len(sys.argv) > 1 else default, sys.argv[2:])
