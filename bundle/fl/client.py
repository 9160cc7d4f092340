"""NVIDIA FLARE client script: one federated site training this bundle with MONAI FL's ``MonaiAlgo``.

FLARE runs this file on every site (``ScriptRunner`` / FedAvg recipe, see :mod:`bundle.fl.job`). Per round it
receives the global model (the trainable part of SAM-UNet), optionally evaluates it on the site's validation
data, trains ``--local_epochs`` on the site's own data with ``configs/train.json``, and sends the weight
differences of the trainable part back; the frozen image encoder never travels (``bundle/fl/config_filters.json``).

Each site points at its own data through its script arguments and config overrides (the job's ``train_args``
for that site, see :func:`bundle.fl.job.site_train_args`)::

    --dataset_dir /data/site1 --train_json /data/site1/image2label_train.json
    --overrides_file /var/fl/site1/overrides.json --override batch_size=4

It only runs under FLARE (``flare.init()``); ``python bundle/fl/client.py --help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from bundle.quiet import quiet_third_party

logger = logging.getLogger("bundle.fl.client")

DEFAULT_BUNDLE_ROOT = str(Path(__file__).resolve().parents[2])
DEFAULT_FILTERS = "bundle/fl/config_filters.json"
ON_SITE_ERROR = ("abort", "continue")
#: the site's own model after its last local round, in ``<workdir>/models/``
SITE_MODEL = "site_model.pt"


class SiteError(RuntimeError):
    """A site cannot take part (missing datalist, mismatching frozen weights, ...); the message names the site."""


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(pairs: Sequence[str] | None, files: Sequence[str] | None = None) -> dict:
    """``KEY=VALUE`` pairs (VALUE parsed as JSON when it is JSON, else a string) and JSON files -> overrides."""
    overrides: dict = {}
    for path in files or []:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: overrides file must hold a JSON object of config id -> value")
        overrides.update(data)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r}: expected KEY=VALUE, e.g. network_def#backbone=vit_b")
        overrides[key] = _parse_value(value)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bundle.fl.client", description="FLARE client API script running the bundle's MonaiAlgo."
    )
    p.add_argument("--bundle_root", default=DEFAULT_BUNDLE_ROOT, help="bundle root (default: this installed bundle)")
    p.add_argument("--config_train", default="configs/train.json", help="training config, relative to the bundle root")
    p.add_argument(
        "--config_filters",
        default=DEFAULT_FILTERS,
        help="MONAI FL filters config relative to the bundle root; 'none' sends every weight (full exchange)",
    )
    p.add_argument("--local_epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--send_weights", action="store_true", help="send full weights instead of weight differences")
    p.add_argument("--dataset_dir", help="this site's data folder (config id dataset_dir)")
    p.add_argument("--train_json", help="this site's training datalist (config id train_json)")
    p.add_argument("--val_json", help="this site's validation datalist (config id val_json)")
    p.add_argument(
        "--validate", action="store_true", help="evaluate each received global model on the validation datalist"
    )
    p.add_argument("--workdir", help="where this site writes checkpoints, logs and cache (default: ./<site name>)")
    p.add_argument("--override", action="append", default=[], metavar="ID=VALUE", help="config override (repeatable)")
    p.add_argument("--overrides_file", action="append", default=[], help="JSON file of config overrides (repeatable)")
    p.add_argument(
        "--on_site_error",
        choices=ON_SITE_ERROR,
        default="abort",
        help="abort: raise, the job fails; continue: report the error and answer every round with an empty update",
    )
    p.add_argument(
        "--frozen_sha256",
        help="expected fingerprint (or its first 16+ hex digits) of the frozen encoder weights (bundle.fl.exchange.frozen_fingerprint)",
    )
    p.add_argument("--record", help="folder where each round's sent update is saved (tests, audits)")
    p.add_argument("--num_threads", type=int, help="torch CPU threads for this site")
    return p


class SiteRunner:
    """The bridge between FLARE's client API (FLModel) and MONAI FL's ``MonaiAlgo`` (ExchangeObject) for one site."""

    def __init__(self, args: argparse.Namespace, site: str) -> None:
        self.args = args
        self.site = site
        self.bundle_root = os.path.abspath(args.bundle_root)
        self.workdir = os.path.abspath(args.workdir or os.path.join(os.getcwd(), site))
        self.algo = None
        self.exclude_vars = None
        self.trainable_keys: list[str] = []
        self.fingerprint = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------------------- set-up
    def overrides(self) -> dict:
        a = self.args
        out = {
            "ckpt_dir": os.path.join(self.workdir, "models"),
            "output_dir": os.path.join(self.workdir, "eval"),
            "cache_dir": os.path.join(self.workdir, "cache"),
            "progress_bar": False,
        }
        for key in ("dataset_dir", "train_json", "val_json"):
            value = getattr(a, key)
            if value:
                out[key] = os.path.abspath(value)
        out.update(parse_overrides(a.override, a.overrides_file))
        return out

    def _config_files(self) -> list[str]:
        path = os.path.join(self.bundle_root, self.args.config_train)
        if not os.path.isfile(path):
            raise SiteError(f"site {self.site}: training config {path} not found")
        return [path]

    def check_data(self, overrides: Mapping) -> None:
        """Resolve the datalist ids with this site's overrides and fail early, naming the site and the file."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(self._config_files())
        parser["bundle_root"] = self.bundle_root
        for key, value in overrides.items():
            parser[key] = value
        ids = ["train_json"] + (["val_json"] if self.args.validate else [])
        for key in ids:
            path = parser.get_parsed_content(key)
            if not os.path.isfile(path):
                raise SiteError(f"site {self.site}: datalist {path} ({key}) not found")

    def initialize(self) -> None:
        from monai.fl.client import MonaiAlgo
        from monai.fl.utils.constants import ExtraItems

        from bundle.fl.exchange import split_keys, trainable_state_keys

        if self.args.num_threads:
            import torch

            torch.set_num_threads(self.args.num_threads)
        overrides = self.overrides()
        self.check_data(overrides)
        filters = None if self.args.config_filters in (None, "", "none") else self.args.config_filters
        if filters and not os.path.isfile(os.path.join(self.bundle_root, filters)):
            raise SiteError(f"site {self.site}: filters config {os.path.join(self.bundle_root, filters)} not found")
        os.makedirs(self.workdir, exist_ok=True)
        self.algo = MonaiAlgo(
            bundle_root=self.bundle_root,
            local_epochs=self.args.local_epochs,
            send_weight_diff=not self.args.send_weights,
            config_train_filename=self.args.config_train,
            train_kwargs=dict(overrides),
            config_evaluate_filename=self.args.config_train if self.args.validate else None,
            eval_kwargs=dict(overrides),
            config_filters_filename=filters,
        )
        self.algo.initialize(extra={ExtraItems.CLIENT_NAME: self.site, ExtraItems.APP_ROOT: ""})
        network = self.algo.trainer.network
        self.exclude_vars = None
        for f in self.algo.post_weight_filters or []:
            self.exclude_vars = getattr(f, "exclude_vars", self.exclude_vars)
        self.trainable_keys, _ = split_keys(network.state_dict(), self.exclude_vars)
        expected = trainable_state_keys(network)
        if self.exclude_vars and set(self.trainable_keys) != set(expected):
            raise SiteError(
                f"site {self.site}: exclude_vars {self.exclude_vars!r} does not match the network's frozen modules "
                f"(sent {len(self.trainable_keys)} keys, trainable {len(expected)})"
            )
        self.check_frozen(network)

    def check_frozen(self, network) -> None:
        from bundle.fl.exchange import FROZEN_VARS, frozen_fingerprint

        self.fingerprint = frozen_fingerprint(network, self.exclude_vars or FROZEN_VARS)
        expected = self.args.frozen_sha256
        if self.exclude_vars and expected and not self.fingerprint.startswith(expected.lower()):
            raise SiteError(
                f"site {self.site}: frozen encoder weights differ from the federation's (sha256 {self.fingerprint[:12]}, "
                f"expected {expected[:12]}); load the same pretrained weights on every site"
            )

    # ------------------------------------------------------------------------------------------------- rounds
    def check_received(self, params: Mapping) -> None:
        received = set(params)
        if self.exclude_vars:
            missing = [k for k in self.trainable_keys if k not in received]
            unknown = sorted(received - set(self.algo.trainer.network.state_dict()))
            if missing or unknown:
                raise SiteError(
                    f"site {self.site}: global model does not match this site's network "
                    f"({len(missing)} trainable keys missing, first {missing[:3]}; unknown {unknown[:3]})"
                )

    def run_round(self, input_model):
        from monai.fl.utils.constants import FlStatistics

        from bundle.fl.exchange import exchange_to_flmodel, flmodel_to_exchange, wire_bytes

        self.check_received(input_model.params or {})
        data = flmodel_to_exchange(input_model)
        metrics = None
        if self.args.validate:
            result = self.algo.evaluate(data)
            metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        self.algo.train(data)
        exchange = self.algo.get_weights()
        meta = {"site": self.site, "frozen_sha256": self.fingerprint}
        output = exchange_to_flmodel(exchange, metrics=metrics, meta=meta)
        stats = {
            "round": input_model.current_round,
            "keys_received": len(input_model.params or {}),
            "bytes_received": wire_bytes(input_model.params or {}),
            "keys_sent": len(output.params),
            "bytes_sent": wire_bytes(output.params),
            "num_steps": int((exchange.statistics or {}).get(FlStatistics.NUM_EXECUTED_ITERATIONS, 0)),
            "params_type": str(output.params_type),
            "metrics": metrics,
        }
        self.history.append(stats)
        logger.info("site %s round %s: %s", self.site, input_model.current_round, stats)
        self.save_local_model()
        if self.args.record:
            import torch

            os.makedirs(self.args.record, exist_ok=True)
            torch.save(
                {"params": output.params, "stats": stats, "frozen_sha256": self.fingerprint},
                os.path.join(self.args.record, f"{self.site}_round{input_model.current_round}.pt"),
            )
        self.write_summary()
        return output

    def save_local_model(self) -> str:
        """Save the site's network after this round's local training as a bundle checkpoint (``{"model",
        "network"}``: the model contract names the network), ``<workdir>/models/site_model.pt``; a site can run it
        with ``configs/inference.json --weights`` without the federation."""
        import torch

        from bundle.io import atomic_write
        from bundle.networks.contract import CONTRACT_KEY
        from bundle.networks.interface import unwrap

        network = unwrap(self.algo.trainer.network)
        path = os.path.join(self.workdir, "models", SITE_MODEL)
        with atomic_write(path) as tmp:
            torch.save({"model": network.state_dict(), CONTRACT_KEY: network.contract()}, tmp)
        return path

    def write_summary(self, error: str | None = None) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        summary = {"site": self.site, "frozen_sha256": self.fingerprint, "rounds": self.history, "error": error}
        from bundle.io import atomic_write

        with atomic_write(os.path.join(self.workdir, "fl_exchange.json")) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))


def serve_error(flare, site: str, message: str) -> None:
    """``--on_site_error continue``: answer every task with an empty update (FedAvg skips it) until the job ends."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        logger.error("site %s skips round %s: %s", site, received.current_round, message)
        # an empty DIFF: the client API does not try to diff it, FedAvg skips it ("Empty result from client")
        flare.send(FLModel(params={}, params_type=ParamsType.DIFF, meta={"site": site, "site_error": message}))


def main(argv: Sequence[str] | None = None) -> int:
    import nvflare.client as flare

    args = build_parser().parse_args(argv)
    quiet_third_party()
    logging.basicConfig(level=logging.INFO)
    flare.init()
    site = flare.get_site_name()
    runner = SiteRunner(args, site)
    try:
        runner.initialize()
    except Exception as err:
        message = str(err) if isinstance(err, SiteError) else f"site {site}: {type(err).__name__}: {err}"
        logger.error(message)
        try:
            runner.write_summary(error=message)
        except OSError:
            pass
        if args.on_site_error == "abort":
            raise SiteError(message) from err
        serve_error(flare, site, message)
        return 1
    try:
        while flare.is_running():
            input_model = flare.receive()
            if input_model is None:
                break
            flare.send(runner.run_round(input_model))
    except Exception as err:
        message = str(err) if isinstance(err, SiteError) else f"site {site}: {type(err).__name__}: {err}"
        logger.error("%s\n%s", message, traceback.format_exc())
        runner.write_summary(error=message)
        if args.on_site_error == "abort":
            raise
        serve_error(flare, site, message)
        return 1
    finally:
        runner.algo and runner.algo.finalize()
    return 0


if __name__ == "__main__":
    # under FLARE this file runs in a thread (runpy); an exit status would not reach anyone
    main()
