"""What travels between a federated site and the server, and how FLARE's FLModel maps onto MONAI FL's ExchangeObject.

SAM-UNet keeps its image encoder (SAM ViT-B, LiteMedSAM TinyViT) frozen: every site loads the same pretrained weights,
so sending them each round wastes bandwidth. Only the *trainable part* travels: the conv branch, the adapters, the
prompt encoder and the mask decoder (every state-dict entry outside the frozen encoder, batch-norm statistics
included, because they change during training).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from monai.fl.utils.exchange_object import ExchangeObject

#: state-dict keys that never travel: the frozen image encoder of :class:`bundle.networks.SAMUNet`
FROZEN_VARS = r"^image_encoder\."


def frozen_children(network: nn.Module) -> list[str]:
    """Names of the direct children of ``network`` whose parameters are all frozen (``requires_grad=False``)."""
    names = []
    for name, child in network.named_children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            names.append(name)
    return names


def trainable_state_keys(network: nn.Module) -> list[str]:
    """State-dict keys of ``network`` outside its fully frozen children (parameters and buffers, in order)."""
    frozen = tuple(f"{name}." for name in frozen_children(network))
    return [key for key in network.state_dict() if not key.startswith(frozen)]


def split_keys(keys: Iterable[str], exclude_vars: str | None = FROZEN_VARS) -> tuple[list[str], list[str]]:
    """Split ``keys`` into (sent, kept local) by the regular expression ``exclude_vars`` (``None``: all are sent)."""
    if not exclude_vars:
        return list(keys), []
    pattern = re.compile(exclude_vars)
    sent, local = [], []
    for key in keys:
        (local if pattern.search(key) else sent).append(key)
    return sent, local


def select(state: Mapping, keys: Iterable[str]) -> dict:
    """``{key: state[key]}`` for ``keys``, in that order."""
    return {key: state[key] for key in keys}


def frozen_fingerprint(network: nn.Module, exclude_vars: str = FROZEN_VARS) -> str:
    """SHA-256 over the names, shapes, dtypes and values of the entries that stay local (the frozen encoder).

    Sites exchanging only the trainable part must hold identical frozen weights; comparing fingerprints checks it.
    """
    state = network.state_dict()
    _, local = split_keys(state, exclude_vars)
    digest = hashlib.sha256()
    for key in sorted(local):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        # flattened first: a 0-dim buffer (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def tensor_bytes(params: Mapping) -> int:
    """Sum of the raw sizes of the tensors / arrays in ``params`` (bytes)."""
    total = 0
    for value in params.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "nbytes"):
            total += int(value.nbytes)
    return total


def wire_bytes(params: Mapping) -> int:
    """Bytes FLARE puts on the wire for ``params`` with the PyTorch exchange format.

    FLARE 2.9 streams each tensor of an FLModel as its own safetensors item
    (``nvflare.app_opt.pt.tensor_downloader.TensorDownloadable.produce_item``); this sums those items' sizes
    (tensor data plus each item's safetensors header). The msgpack envelope (round number, metrics, meta) adds
    a few hundred bytes and is not counted.
    """
    from safetensors.torch import save

    total = 0
    for key, value in params.items():
        tensor = torch.as_tensor(value).detach().cpu().contiguous()
        total += len(save({key: tensor}))
    return total


# ----------------------------------------------------------------------------------------------- FLModel <-> Exchange
def flmodel_to_exchange(model) -> "ExchangeObject":
    """A received FLARE ``FLModel`` (global weights) as a MONAI FL ``ExchangeObject`` (tensors, CPU)."""
    from monai.fl.utils.constants import WeightType
    from monai.fl.utils.exchange_object import ExchangeObject
    from nvflare.app_common.abstract.fl_model import ParamsType

    params = {key: torch.as_tensor(value) for key, value in (model.params or {}).items()}
    weight_type = WeightType.WEIGHT_DIFF if model.params_type == ParamsType.DIFF else WeightType.WEIGHTS
    return ExchangeObject(weights=params, weight_type=weight_type, metrics=model.metrics)


def exchange_to_flmodel(exchange, metrics: dict | None = None, meta: dict | None = None):
    """A MONAI FL ``ExchangeObject`` (from ``MonaiAlgo.get_weights``) as a FLARE ``FLModel`` to send.

    Weight differences become ``ParamsType.DIFF``; the number of iterations run this round becomes
    ``NUM_STEPS_CURRENT_ROUND``, the weight FedAvg gives this site.
    """
    from monai.fl.utils.constants import FlStatistics, WeightType
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    params_type = ParamsType.DIFF if exchange.weight_type == WeightType.WEIGHT_DIFF else ParamsType.FULL
    meta = dict(meta or {})
    stats = exchange.statistics or {}
    if FlStatistics.NUM_EXECUTED_ITERATIONS in stats:
        meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] = int(stats[FlStatistics.NUM_EXECUTED_ITERATIONS])
    params = {key: value.detach().cpu() for key, value in (exchange.weights or {}).items()}
    return FLModel(params=params, params_type=params_type, metrics=metrics, meta=meta)
