"""Federated learning glue: NVIDIA FLARE client script running MONAI FL's MonaiAlgo on this bundle, FedAvg job.

- :mod:`bundle.fl.client`: the FLARE client API script (init, receive, MonaiAlgo train/evaluate/get_weights, send)
- :mod:`bundle.fl.job`: the FedAvg recipe (per-site datalists and overrides) and a simulator run
- :mod:`bundle.fl.exchange`: trainable-only exchange (frozen encoder stays local), FLModel <-> ExchangeObject
- :mod:`bundle.fl.filters`: the MONAI FL filter dropping the frozen encoder from what a site sends
- :mod:`bundle.fl.model`: the server's global model, the trainable part of the bundle's network

See docs/federated.md.
"""

from .exchange import FROZEN_VARS, frozen_fingerprint, split_keys, trainable_state_keys, wire_bytes
from .filters import ExcludeFrozenWeights

__all__ = [
    "FROZEN_VARS",
    "ExcludeFrozenWeights",
    "frozen_fingerprint",
    "split_keys",
    "trainable_state_keys",
    "wire_bytes",
]
