"""Helpers shared by the training / evaluation tests: real SA-Med2D-style data converted from ../shared/data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

#: small, fast network for tests (same structure as ViT-B / ResNet34), as bundle config overrides
SMALL_ARCH = {
    "network_def#backbone": "vit_tiny",
    "network_def#conv_branch": "resnet18",
    "network_def#decoder_tokens": "med",
    "weights": "",  # no starting weights (None is dropped as a command-line override)
    "pixel_normalization": "sam",
}
#: ... in a 128 x 128 frame
SMALL_NET = {**SMALL_ARCH, "image_size": 128}


def convert_crops(base: Path) -> Path:
    """Convert the committed CT and MR crops of tests/data (one case each to train and validation, axial and
    coronal slices) with the bundle's converter, once per test session (cached on disk)."""
    out = base / "sa_med2d_crops"
    if (out / "SAMed2D_v1.json").is_file():
        return out
    from bundle.data.convert import Case, convert_to_sa_med2d

    data = REPO_ROOT / "tests" / "data"
    cases = [
        Case(
            image=str(data / f"{name}_crop_image.nrrd"),
            label=str(data / f"{name}_crop_label.nrrd"),
            case=name,
            modality=modality,
        )
        for name, modality in (("lung1", "ct"), ("breast1", "mr"))
    ]
    convert_to_sa_med2d(cases, out, "Crops", axes=("z", "y"), fractions=(0.5, 0.5, 0.0), window="lung", progress=False)
    return out


def slice_index(image_key: str) -> int:
    """Slice number of an SA-Med2D image name ``...--x_0040.png``."""
    return int(Path(image_key).stem.rsplit("_", 1)[-1])


def convert_brain(base: Path) -> Path:
    """Convert brain1 (MR, tumour) along x with the bundle's converter, once per test session (cached on disk)."""
    out = base / "sa_med2d_brain1"
    if (out / "SAMed2D_v1.json").is_file():
        return out
    from bundle.data.convert import Case, convert_to_sa_med2d

    data = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not (data / "brain1_image.nrrd").is_file():
        pytest.skip(f"real scans not found at {data}")
    convert_to_sa_med2d(
        [
            Case(
                image=str(data / "brain1_image.nrrd"),
                label=str(data / "brain1_label.nrrd"),
                case="brain1",
                modality="mr",
            )
        ],
        out,
        "Pyradiomics",
        axes=("x",),
        fractions=(1.0, 0.0, 0.0),
        progress=False,
    )
    return out


def write_split(
    root: Path, name: str, train_every: int = 2, train_limit: int = 12, val_limit: int = 8
) -> tuple[Path, Path]:
    """Slices with even index -> ``<name>_train.json`` (image -> masks); odd index -> ``<name>_val.json`` (mask ->
    image). Held-out slices are never trained on (neighbouring slices of the same case, 6.5 mm apart at most)."""
    all_images = json.loads((root / "SAMed2D_v1.json").read_text())
    keys = sorted(all_images, key=slice_index)
    train = {k: all_images[k] for k in keys if slice_index(k) % train_every == 0}
    held = [k for k in keys if slice_index(k) % train_every != 0]
    train = dict(list(train.items())[:: max(1, len(train) // train_limit)][:train_limit])
    held = held[:: max(1, len(held) // val_limit)][:val_limit]
    val = {all_images[k][0]: k for k in held}
    train_json, val_json = root / f"{name}_train.json", root / f"{name}_val.json"
    train_json.write_text(json.dumps(train, indent=1))
    val_json.write_text(json.dumps(val, indent=1))
    return train_json, val_json


def bundle_args(overrides: dict) -> list[str]:
    """``--key value`` arguments for ``python -m monai.bundle run``."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]  # fire parses Python literals
    return args


def env_one_thread() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return env


def run_bundle(config_files: list[str], overrides: dict, cwd: Path = REPO_ROOT, timeout: int = 600, torchrun: int = 0):
    """Run ``monai.bundle run`` in a subprocess (one thread per process) and return the CompletedProcess."""
    configs = "[" + ",".join(f"'{c}'" for c in config_files) + "]"
    if torchrun:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
    else:
        cmd = [PYTHON]
    cmd += ["-m", "monai.bundle", "run", "--config_file", configs, *bundle_args(overrides)]
    return subprocess.run(cmd, cwd=cwd, env=env_one_thread(), capture_output=True, text=True, timeout=timeout)


def workflow(config_files, workflow_type, tmp_path, **overrides):
    """A MONAI ``ConfigWorkflow`` of ``configs/<config_files>`` with the small network, outputs under ``tmp_path``."""
    from monai.bundle import ConfigWorkflow

    files = [str(REPO_ROOT / "configs" / f) for f in config_files]
    return ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        logging_file=str(REPO_ROOT / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(tmp_path),
        num_workers=0,
        progress_bar=False,
        **SMALL_NET,
        **overrides,
    )
