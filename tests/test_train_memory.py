"""Training memory switches: the same gradients on a real step, micro-batch accumulation, the out-of-memory report.

Real data: the committed CT crop of tests/data (lung tumour; the MR crop is the validation case), converted with
the bundle's converter and read through train.json's own preprocessing. The network is SAM-UNet-Lite's structure
(LiteMedSAM's TinyViT with its weights, ResNet34 branch, fusion, SAM tokens) at 128 px to keep the test fast.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.losses import DiceFocalLoss
from train_helpers import REPO_ROOT, SMALL_NET, convert_crops, run_bundle, workflow

from bundle.engines import SAMUNetTrainer, TrainingOutOfMemoryError
from bundle.networks import SAMUNet

SIZE = 128
OFF = {"checkpoint_activations": False, "stepwise_backward": False, "decoder_batch": None}


@pytest.fixture(scope="module")
def real_batch(tmp_path_factory):
    """Four CT slices with their tumour masks, as train.json's preprocessing delivers them."""
    root = convert_crops(tmp_path_factory.getbasetemp())
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "configs" / "train.json"))
    parser.update(
        {
            "dataset_dir": str(root),
            "image_size": SIZE,
            "cache": "none",
            "num_workers": 0,
            "masks_per_image": 2,
            "batch_size": 4,
            "train#dataloader#shuffle": False,
        }
    )
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["label"].shape == (4, 2, SIZE, SIZE)
    assert (batch["label"].flatten(2).amax(2) > 0).all()  # one tumour mask per slice, drawn twice (with replacement)
    return batch


@pytest.fixture(scope="module")
def lite():
    """SAM-UNet-Lite with LiteMedSAM's weights; its zero-initialised injection layers given small random weights
    (as after some training), so that gradients flow back through the conv branch and the frozen TinyViT."""
    torch.manual_seed(0)
    net = SAMUNet("tiny_vit", image_size=SIZE, conv_branch="resnet34", decoder_tokens="sam", weights="litemedsam")
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.02)
    return net


def one_step(net, batch, iterations=3, prompt_probs=None, **switches):
    """Gradients of every trainable parameter after one training iteration (learning rate 0), and the output."""
    net = copy.deepcopy(net)
    params = [p for p in net.parameters() if p.requires_grad]
    trainer = SAMUNetTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[batch],
        network=net,
        optimizer=torch.optim.SGD(params, lr=0.0),
        loss_function=DiceFocalLoss(sigmoid=True, gamma=2.0, alpha=0.25, lambda_dice=20.0),
        prompt_probs=prompt_probs or {"box": 0.5, "points": 0.5},
        interactive_iterations=iterations,
        prompt_seed=0,
        **switches,
    )
    trainer.run()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    return grads, trainer.state.output[0]


def assert_same_logits(pred, reference):
    """Equal up to float rounding: decoding one mask at a time runs other matrix shapes than all at once."""
    scale = float(reference.abs().max())
    torch.testing.assert_close(pred, reference, rtol=0, atol=1e-5 * scale)


def assert_same_gradients(reference, grads, tol=1e-5):
    """Every parameter's gradient agrees within ``tol`` (relative to its largest entry where that exceeds 1)."""
    assert grads.keys() == reference.keys()

    def error(k):
        return float((grads[k] - reference[k]).abs().max()) / max(1.0, float(reference[k].abs().max()))

    worst = max(grads, key=error)
    print(f"largest gradient difference: {worst} {error(worst):.3g} (scale {float(reference[worst].abs().max()):.3g})")
    assert error(worst) <= tol, f"{worst}: gradients differ by {error(worst):.3g}"


@pytest.fixture(scope="module")
def native_reference(lite, real_batch):
    """Gradients and output of one step with every switch off, PyTorch's native convolutions, one thread."""
    torch.set_num_threads(1)
    with torch.backends.mkldnn.flags(enabled=False):
        return one_step(lite, real_batch, **OFF)


@pytest.mark.slow
@pytest.mark.parametrize(
    "switches",
    [
        {},  # the trainer's (and train.json's) defaults: all memory switches on
        {**OFF, "checkpoint_activations": True},
        {**OFF, "stepwise_backward": True},
    ],
    ids=["defaults", "checkpoint_activations", "stepwise_backward"],
)
def test_memory_switches_give_the_same_gradients_on_a_real_step(lite, real_batch, native_reference, switches):
    """Within 1e-5 with PyTorch's native convolutions where the decoder runs every mask at once. Decoding one mask at
    a time (``decoder_batch`` 1, the default) gives the same losses (1e-6) and logits, but one entry of one bias
    gradient differs by 9e-4 (mask_decoder.transformer.layers.1.mlp.lin1.bias, -0.0272 against -0.0263) on
    AVX-512 CPUs (a 2-core Xeon VM and a CI machine), against 4.8e-6 on the project's AVX2 EPYC: presumably the
    kernels torch picks there round one-mask matrices differently and the corrective steps amplify it (not traced
    further; the corrective clicks are the same mask by mask, a second thread moves that gradient by 1e-7, and
    without corrective steps the two agree within 1e-6). So this path is checked to 5e-3, which a step whose
    gradient is lost or counted twice (a third of it or more) still fails. oneDNN's convolution backward sums a bias
    gradient over all masks of a pass in one fp32 reduction whose own rounding error reaches 1e-4 (measured: 2.2e-4
    from the exact sum of its terms for the fusion path's last bias, scale 2.3), so with oneDNN (the default on CPU)
    the switches are checked to 5e-3 too."""
    reference, ref_out = native_reference
    torch.set_num_threads(1)
    with torch.backends.mkldnn.flags(enabled=False):
        grads, out = one_step(lite, real_batch, **switches)
    torch.testing.assert_close(out["step_losses"], ref_out["step_losses"], rtol=1e-6, atol=0)
    assert_same_logits(out["pred"], ref_out["pred"])
    assert_same_gradients(reference, grads, tol=1e-5 if switches else 5e-3)  # the defaults: one mask at a time
    # the gradient passed through the frozen TinyViT into the conv branch: a test that can fail
    assert float(reference["conv_branch.conv1.weight"].abs().max()) > 1e-4
    assert float(reference["adapters_in.1.reshaper.0.weight"].abs().max()) > 1e-4
    if not switches:  # the users' path, oneDNN on
        reference, _ = one_step(lite, real_batch, **OFF)
        grads, _ = one_step(lite, real_batch, **switches)
        assert_same_gradients(reference, grads, tol=5e-3)


def test_checkpointed_vit_gives_the_same_gradients(real_batch):
    """The ViT backbone (a small ViT of SAM's structure) recomputes its blocks with the same gradients."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = SAMUNet("vit_tiny", image_size=SIZE, conv_branch="resnet18", decoder_tokens="med")
    reference, _ = one_step(net, real_batch, iterations=1, **OFF)
    grads, _ = one_step(net, real_batch, iterations=1, **{**OFF, "checkpoint_activations": True})
    assert_same_gradients(reference, grads, tol=0)
    assert float(reference["conv_branch.conv1.weight"].abs().max()) > 0


def test_accumulate_steps_keeps_the_batch_gradients(real_batch):
    """Micro-batches of whole images, weighted by their masks, add up to the batch's gradients and loss (no
    BatchNorm in the trainable part here: with a conv branch, its statistics are per micro-batch), one optimiser
    step per iteration."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = SAMUNet("vit_tiny", image_size=SIZE, conv_branch="none", decoder_tokens="med")
    batch = dict(real_batch, label=real_batch["label"].clone())
    batch["label"][1, 1] = 0  # 2 + 1 + 2 + 2 masks: micro-batches of 3, 2 and 2 masks
    reference, ref_out = one_step(net, batch, accumulate_steps=1)
    steps = []
    original = torch.optim.SGD.step
    torch.optim.SGD.step = lambda self, *a, **k: steps.append(1) or original(self, *a, **k)
    try:
        grads, out = one_step(net, batch, accumulate_steps=3)
    finally:
        torch.optim.SGD.step = original
    assert steps == [1] and out["num_masks"] == ref_out["num_masks"] == 7
    torch.testing.assert_close(out["loss"], ref_out["loss"], rtol=1e-6, atol=0)
    torch.testing.assert_close(out["step_losses"], ref_out["step_losses"], rtol=1e-6, atol=0)
    assert_same_logits(out["pred"], ref_out["pred"])
    assert_same_gradients(reference, grads)


class FakeCudaMemory:
    """Stands in for ``torch.cuda``'s memory figures on this GPU-less machine: 10 GiB free, 1 GiB held, and a
    training step that takes 3 GiB per image above what is held."""

    device = torch.device("cuda:0")
    GIB = 2**30

    def __init__(self, trainer):
        self.trainer, self.peak_bytes = trainer, 0

    def release(self):
        pass

    def free(self):
        return 10 * self.GIB

    def allocated(self):
        return self.GIB

    def reset_peak(self):
        self.peak_bytes = 0

    def peak(self):
        return self.peak_bytes


def test_out_of_memory_reports_memory_per_image_and_what_fits(real_batch, monkeypatch):
    """CUDA runs out of memory when more than one image is in a micro-batch: the trainer measures one image and
    says how many fit and which accumulate_steps keeps the batch, instead of a bare traceback; no optimiser step."""
    torch.manual_seed(0)
    net = SAMUNet("vit_tiny", image_size=SIZE, conv_branch="resnet18", decoder_tokens="med")
    params = [p for p in net.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    trainer = SAMUNetTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[real_batch],
        network=net,
        optimizer=torch.optim.Adam(params, 1e-3),
        loss_function=DiceFocalLoss(sigmoid=True),
        interactive_iterations=1,
        prompt_seed=0,
        accumulate_steps=1,
    )
    memory = trainer.memory = FakeCudaMemory(trainer)
    step = trainer.step_module.forward

    def forward(image, *args, **kwargs):
        if image.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        memory.peak_bytes = memory.allocated() + 3 * memory.GIB  # what one image's step took
        return step(image, *args, **kwargs)

    monkeypatch.setattr(trainer.step_module, "forward", forward)
    with pytest.raises(TrainingOutOfMemoryError) as error:
        trainer.run()
    message = str(error.value)
    assert isinstance(error.value, torch.OutOfMemoryError)
    assert "CUDA out of memory in a training step of 4 image(s) at once" in message
    assert "one image takes 3.00 GiB beside 1.00 GiB of weights and optimiser state" in message
    assert re.search(r"10\.00 GiB are free, so at most 3 image\(s\) fit", message)
    assert "set accumulate_steps to 2 (micro-batches of 2 images, the same effective batch of 4)" in message
    assert all(torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.slow
def test_documented_training_command_runs_with_the_progress_bar(tmp_path_factory, tmp_path):
    """`python -m monai.bundle run --config_file configs/train.json --dataset_dir DATA` as the docs write it (a small
    network and short run added), progress bar on, memory switches and accumulation at train.json's defaults."""
    root = convert_crops(tmp_path_factory.getbasetemp())
    result = run_bundle(
        ["configs/train.json"],
        {
            "dataset_dir": str(root),
            "bundle_root": str(tmp_path),
            "max_epochs": 1,
            "num_workers": 0,
            "cache": "none",
            "interactive_iterations": 2,
            **SMALL_NET,
        },
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert re.search(r"\[2/2\] 100%\|\S+, loss=\d", log), log[-2000:]  # the progress bar with the loss
    assert (tmp_path / "models" / "checkpoint_final.pt").is_file()


def loss_curve(root, bundle_root, **overrides):
    """Losses of 8 train.json iterations (2 epochs of 4) on the real CT slices, small network, one thread."""
    torch.set_num_threads(1)
    run = workflow(
        ["train.json"],
        "train",
        bundle_root,
        dataset_dir=str(root),
        max_epochs=2,
        epoch_length=4,
        batch_size=4,
        accumulate_steps=1,
        masks_per_image=2,
        cache="none",
        interactive_iterations=2,
        val_interval=100,
        **overrides,
    )
    run.initialize()
    losses = []
    run.trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    run.run()
    run.finalize()
    torch.set_num_threads(1)
    return torch.tensor(losses)


@pytest.mark.slow
def test_short_training_run_has_the_same_loss_curve(tmp_path_factory, tmp_path):
    """The memory switches on (train.json's defaults) and off (and gradients zeroed instead of set to None) give the
    same losses over 8 iterations: the first one equal, and later ones within 5e-3 (relative), the tolerance of the
    one-mask-at-a-time gradients in the test above, which training amplifies (the curves drift by 9e-4 on AVX-512
    machines, 2e-7 on the project's AVX2 EPYC; the run without switches on 2 threads instead of 1 by 3e-4)."""
    root = convert_crops(tmp_path_factory.getbasetemp())
    off = loss_curve(root, tmp_path / "off", **OFF, optim_set_to_none=False)
    on = loss_curve(root, tmp_path / "on")
    drift = ((on - off).abs() / off).max()
    print(f"loss curve off {off.tolist()}\n  on - off: {drift:.2g} relative")
    assert len(on) == len(off) == 8
    torch.testing.assert_close(on[0], off[0], rtol=1e-6, atol=0)
    assert drift <= 5e-3
