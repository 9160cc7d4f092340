"""The FedAvg job (NVIDIA FLARE 2.9 recipe) for this bundle, and a simulator run of it.

Server: FLARE's FedAvg controller with in-time weighted averaging (weights = local iterations run by each site);
its global model is :class:`bundle.fl.model.TrainablePart` (only the trainable part of SAM-UNet), persisted as
``FL_global_model.pt``. Clients: :mod:`bundle.fl.client` (FLARE client API + MONAI FL ``MonaiAlgo`` on
``configs/train.json``); each site has its own datalist, data folder and overrides.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .client import DEFAULT_FILTERS, ON_SITE_ERROR
from .exchange import FROZEN_VARS

CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client.py")
EXCHANGES = ("trainable", "full")


@dataclass
class Site:
    """One federated site: its name, its data and its own config overrides (config id -> value)."""

    name: str
    dataset_dir: str | None = None
    train_json: str | None = None
    val_json: str | None = None
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() or c in "/\\" for c in self.name):
            raise ValueError(f"site name {self.name!r}: use letters, digits, '-' or '_'")


def _check_path_arg(site: str, what: str, value: str) -> str:
    # FLARE splits the in-process script arguments at whitespace, without shell quoting
    if any(c.isspace() for c in value):
        raise ValueError(
            f"site {site}: {what} {value!r} contains whitespace, which FLARE's script arguments cannot carry"
        )
    return value


def _override_tokens(site: str, overrides: Mapping) -> list[str]:
    """``--override ID=VALUE`` tokens that survive FLARE's argument splitting (whitespace, no shell quoting)."""
    tokens = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            if parsed != value:
                raise ValueError(
                    f"site {site}: override {key}={value!r} is a string that reads as JSON; give the site an overrides file"
                )
        if any(c.isspace() or c in "'\"" for c in f"{key}{text}"):
            raise ValueError(
                f"site {site}: override {key}={text!r} contains whitespace or quotes, which FLARE's script arguments "
                "cannot carry; give the site an overrides file (--overrides_file)"
            )
        tokens += ["--override", f"{key}={text}"]
    return tokens


def site_train_args(
    site: Site,
    workdir: str,
    shared_overrides: Mapping | None = None,
    bundle_root: str | None = None,
    config_file: str = "configs/train.json",
    exchange: str = "trainable",
    local_epochs: int = 1,
    on_site_error: str = "abort",
    validate: bool = False,
    frozen_sha256: str | None = None,
    record: str | None = None,
    num_threads: int | None = None,
) -> str:
    """The client script arguments for ``site`` (they travel in the job): its data, the shared overrides then its
    own, and the run options. ``bundle_root`` None: each site uses the bundle installed there."""
    args = {
        "--bundle_root": bundle_root,
        "--config_train": config_file,
        "--config_filters": DEFAULT_FILTERS if exchange == "trainable" else "none",
        "--local_epochs": str(local_epochs),
        "--workdir": workdir,
        "--on_site_error": on_site_error,
        "--dataset_dir": site.dataset_dir,
        "--train_json": site.train_json,
        "--val_json": site.val_json,
        "--frozen_sha256": frozen_sha256,
        "--record": record,
        "--num_threads": None if num_threads is None else str(num_threads),
    }
    tokens = []
    for key, value in args.items():
        if value is not None:
            tokens += [key, _check_path_arg(site.name, key, str(value))]
    if validate:
        tokens.append("--validate")
    tokens += _override_tokens(site.name, {**(shared_overrides or {}), **site.overrides})
    return " ".join(tokens)


def make_recipe(
    sites: Sequence[Site],
    workdir: str,
    num_rounds: int = 2,
    shared_overrides: Mapping | None = None,
    bundle_root: str | None = None,
    config_file: str = "configs/train.json",
    exchange: str = "trainable",
    local_epochs: int = 1,
    on_site_error: str = "abort",
    validate: bool = False,
    frozen_sha256: str | None = None,
    record: str | None = None,
    num_threads: int | None = None,
    name: str = "sam_unet_fedavg",
    key_metric: str = "val_mean_dice",
):
    """A FLARE ``FedAvgRecipe`` for ``sites``; ``workdir/<site>`` holds each site's outputs (a path on that site).

    ``bundle_root`` None: the server and every site use the bundle installed where they run.

    ``exchange="trainable"`` sends only the trainable part both ways (server model = ``TrainablePart``, clients
    filter with ``bundle/fl/config_filters.json``); ``"full"`` sends the whole network. ``on_site_error``:
    ``"abort"`` stops the job when a site fails, ``"continue"`` aggregates the sites that succeeded.
    """
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.client.config import ExchangeFormat, TransferType
    from nvflare.recipe.utils import set_per_site_config

    if exchange not in EXCHANGES:
        raise ValueError(f"exchange {exchange!r}: expected one of {EXCHANGES}")
    if on_site_error not in ON_SITE_ERROR:
        raise ValueError(f"on_site_error {on_site_error!r}: expected one of {ON_SITE_ERROR}")
    if not sites:
        raise ValueError("no sites")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")

    class _Recipe(FedAvgRecipe):
        def _get_controller_kwargs(self):
            # continue: a failed site's result is ignored and the others are averaged; abort: the job stops
            return {"ignore_result_error": on_site_error == "continue"}

    model = {
        "path": "bundle.fl.model.TrainablePart",
        "args": {
            "bundle_root": bundle_root,
            "config_file": config_file,
            "overrides": dict(shared_overrides or {}),
            "exclude_vars": FROZEN_VARS if exchange == "trainable" else None,
        },
    }
    recipe = _Recipe(
        name=name,
        model=model,
        min_clients=len(sites),
        num_rounds=num_rounds,
        train_script=CLIENT_SCRIPT,
        server_expected_format=ExchangeFormat.PYTORCH,
        params_transfer_type=TransferType.DIFF,
        key_metric=key_metric,
    )
    set_per_site_config(
        recipe,
        {
            s.name: {
                "train_args": site_train_args(
                    s,
                    os.path.join(os.path.abspath(workdir), s.name),
                    shared_overrides,
                    bundle_root,
                    config_file,
                    exchange,
                    local_epochs,
                    on_site_error,
                    validate,
                    frozen_sha256,
                    record,
                    num_threads,
                )
            }
            for s in sites
        },
    )
    return recipe


def find_global_model(workspace: str) -> str:
    """Path of the server's final global model (``FL_global_model.pt``) in a simulator workspace."""
    for root, _, files in os.walk(workspace):
        if "FL_global_model.pt" in files and os.sep + "server" + os.sep in root + os.sep:
            return os.path.join(root, "FL_global_model.pt")
    raise FileNotFoundError(f"no FL_global_model.pt under {workspace}/server")


def simulate(recipe, workspace: str, sites: Sequence[Site], threads: int | None = None, log_config: str | None = None):
    """Run ``recipe`` in FLARE's simulator (``SimEnv``) under ``workspace``; returns the job's result folder."""
    from nvflare.recipe.sim_env import SimEnv

    env = SimEnv(
        clients=[s.name for s in sites],
        num_threads=threads or len(sites),
        workspace_root=os.path.abspath(workspace),
        log_config=log_config,
    )
    run = recipe.run(env)
    return run.get_result()
