"""The server's global model: the trainable part of the bundle's network (what the sites exchange)."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn as nn

from bundle.config import bundle_parser

from .exchange import FROZEN_VARS, split_keys


def config_value(bundle_root: str, config_file: str | list, key: str, overrides: Mapping | None = None):
    """The parsed value of ``key`` in the bundle config with ``overrides`` (no component instantiated)."""
    parser = bundle_parser(config_file, bundle_root, overrides)
    return parser.get_parsed_content(key, instantiate=False) if key in parser else None


def build_bundle_network(
    bundle_root: str,
    config_file: str | list = "configs/train.json",
    network_id: str = "network_def",
    overrides: Mapping | None = None,
) -> nn.Module:
    """Instantiate ``network_id`` from the bundle config with ``overrides`` (ids as in ``monai.bundle run``)."""
    return bundle_parser(config_file, bundle_root, overrides).get_parsed_content(network_id, instantiate=True)


class TrainablePart(nn.Module):
    """The children of the bundle's network that are not excluded by ``exclude_vars`` (default: frozen encoder).

    Its ``state_dict()`` has the network's own key names, so it is the FedAvg global model the server persists
    and sends: FLARE's ``PTFileModelPersistor`` instantiates it from ``{"path": "bundle.fl.model.TrainablePart",
    "args": {...}}``.
    """

    def __init__(
        self,
        bundle_root: str | None = None,
        config_file: str | list = "configs/train.json",
        network_id: str = "network_def",
        overrides: Mapping | None = None,
        exclude_vars: str = FROZEN_VARS,
    ) -> None:
        super().__init__()
        if not bundle_root:
            from .client import DEFAULT_BUNDLE_ROOT

            bundle_root = DEFAULT_BUNDLE_ROOT  # the bundle installed where the server runs
        network = build_bundle_network(bundle_root, config_file, network_id, overrides)
        self.exclude_vars = exclude_vars
        for name, child in network.named_children():
            keys = [f"{name}.{key}" for key in child.state_dict()]
            sent, local = split_keys(keys, exclude_vars)
            if sent and local:
                raise ValueError(
                    f"exclude_vars {exclude_vars!r} splits module {name!r}; exclude whole top-level modules "
                    f"(kept {sent[:2]}, excluded {local[:2]})"
                )
            if sent:
                self.add_module(name, child)
        if not list(self.children()):
            raise ValueError(f"exclude_vars {exclude_vars!r} leaves no trainable module in {network_id}")
