#!/usr/bin/env python
"""Federated training of this bundle in NVIDIA FLARE's simulator: N sites, R rounds, each on its own data.

    python scripts/fl_simulate.py --data out/site1 --data out/site2 --rounds 2 --workspace runs/fl

Each --data folder is one site's SA-Med2D output of scripts/prepare_sa_med2d.py (or use --sites-file for
explicit datalists and per-site overrides). Run with --help for every option; docs/federated.md explains
the job, the trainable-only exchange and how a real site runs it. The logic lives in `bundle.fl.simulate`.
"""

import sys

from bundle.fl.simulate import main

if __name__ == "__main__":
    sys.exit(main())
