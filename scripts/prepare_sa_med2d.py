#!/usr/bin/env python
"""Convert labelled 3D volumes into the SA-Med2D-16M layout (images/, masks/, JSON files, case-level splits).

    python scripts/prepare_sa_med2d.py --pair lung1_image.nrrd lung1_label.nrrd --dataset Pyradiomics \
        --modality ct --window lung --axes z x --output out/sa_med2d

Run with --help for every option. The logic lives in `bundle.data.convert` (importable, tested in-process).
"""

import sys

from bundle.data.convert import main

if __name__ == "__main__":
    sys.exit(main())
