"""Run the bundle's FedAvg job in NVIDIA FLARE's simulator: N sites, R rounds, local data (``scripts/fl_simulate.py``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence

from ..quiet import quiet_third_party
from .client import ON_SITE_ERROR, parse_overrides
from .job import EXCHANGES, Site, find_global_model, make_recipe, simulate

logger = logging.getLogger("bundle.fl.simulate")


def sites_from_args(args: argparse.Namespace) -> list[Site]:
    """Sites from ``--sites-file`` (JSON list) or ``--data`` folders (SA-Med2D layout, one per site)."""
    sites = []
    if args.sites_file:
        with open(args.sites_file, encoding="utf-8") as f:
            items = json.load(f)
        if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
            raise ValueError(
                f"{args.sites_file}: expected a JSON list of objects with 'name' (and dataset_dir, train_json, val_json, overrides)"
            )
        base = os.path.dirname(os.path.abspath(args.sites_file))
        for item in items:
            unknown = set(item) - {"name", "dataset_dir", "train_json", "val_json", "overrides"}
            if unknown:
                raise ValueError(f"{args.sites_file}: site {item['name']!r} has unknown fields {sorted(unknown)}")
            paths = {k: os.path.join(base, item[k]) for k in ("dataset_dir", "train_json", "val_json") if item.get(k)}
            sites.append(Site(item["name"], overrides=dict(item.get("overrides") or {}), **paths))
    if args.sites and args.sites > 1 and len(args.data or []) == 1 and not args.sites_file:
        return split_sites(args.data[0], args.sites, os.path.join(os.path.abspath(args.workspace), "datalists"))
    for i, folder in enumerate(args.data or [], start=len(sites) + 1):
        folder = os.path.abspath(folder)
        sites.append(
            Site(
                f"site-{i}",
                dataset_dir=folder,
                train_json=os.path.join(folder, "image2label_train.json"),
                val_json=os.path.join(folder, "label2image_validation.json"),
            )
        )
    if not sites:
        raise ValueError("no sites: give --data FOLDER (one per site, repeatable) or --sites-file FILE")
    if args.sites and args.sites != len(sites):
        raise ValueError(f"--sites {args.sites} but {len(sites)} site(s) given by --data / --sites-file")
    return sites


def split_sites(folder: str, n_sites: int, out_dir: str) -> list[Site]:
    """``n_sites`` sites sharing one SA-Med2D folder: its training images are dealt out by case (by image when
    there are fewer cases than sites), each site gets its own datalist; every site validates on the whole
    validation datalist."""
    from bundle.data.sa_med2d import parse_name

    folder = os.path.abspath(folder)
    train_json = os.path.join(folder, "image2label_train.json")
    if not os.path.isfile(train_json):
        raise ValueError(f"--data {folder}: no image2label_train.json to split between {n_sites} sites")
    with open(train_json, encoding="utf-8") as f:
        images = json.load(f)

    def case(image: str) -> str:
        try:
            return parse_name(image).case_id
        except ValueError:
            return image

    groups: dict[str, list[str]] = {}
    for image in sorted(images):
        groups.setdefault(case(image), []).append(image)
    units = list(groups.values()) if len(groups) >= n_sites else [[i] for i in sorted(images)]
    if len(units) < n_sites:
        raise ValueError(f"--data {folder}: {len(images)} training image(s) cannot be split between {n_sites} sites")
    os.makedirs(out_dir, exist_ok=True)
    sites = []
    for index in range(n_sites):
        own = [image for unit in units[index::n_sites] for image in unit]
        mapping = {os.path.join(folder, i): [os.path.join(folder, m) for m in images[i]] for i in own}
        path = os.path.join(out_dir, f"site-{index + 1}_train.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(mapping, f, indent=1)
        sites.append(
            Site(
                f"site-{index + 1}",
                dataset_dir=folder,
                train_json=path,
                val_json=os.path.join(folder, "label2image_validation.json"),
            )
        )
    return sites


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl_simulate.py",
        description="Federated training of this bundle in NVIDIA FLARE's simulator (FedAvg, MONAI FL MonaiAlgo on "
        "configs/train.json); each site trains on its own data and only the trainable part of SAM-UNet travels.",
    )
    p.add_argument(
        "--data", action="append", help="one site's SA-Med2D folder (prepare_sa_med2d.py output); repeat per site"
    )
    p.add_argument(
        "--sites-file",
        help="JSON list of sites: name, dataset_dir, train_json, val_json, overrides (paths relative to the file)",
    )
    p.add_argument(
        "--sites",
        type=int,
        help="number of sites: with a single --data folder its training images are split between them by case; "
        "otherwise checked against --data / --sites-file",
    )
    p.add_argument("--rounds", type=int, default=2, help="FedAvg rounds")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--workspace", required=True, help="new folder for the simulator workspace and the sites' outputs")
    p.add_argument(
        "--exchange",
        choices=EXCHANGES,
        default="trainable",
        help="trainable: frozen encoder stays local; full: send everything",
    )
    p.add_argument(
        "--on-site-error", choices=ON_SITE_ERROR, default="abort", help="a failing site stops the job, or is skipped"
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="config override for every site and the server model",
    )
    p.add_argument("--overrides-file", action="append", default=[], help="JSON file of shared config overrides")
    p.add_argument(
        "--validate", action="store_true", help="sites evaluate each global model on their validation datalist"
    )
    p.add_argument(
        "--no-frozen-check", action="store_true", help="do not check that every site's frozen encoder matches"
    )
    p.add_argument("--record", action="store_true", help="save each site's update per round under WORKSPACE/record")
    p.add_argument("--threads", type=int, help="simulator threads (default: one per site)")
    p.add_argument("--site-threads", type=int, help="torch CPU threads per site")
    p.add_argument("--bundle-root", default=None, help="bundle root (default: this installed bundle)")
    p.add_argument("--config", default="configs/train.json", help="training config relative to the bundle root")
    return p


_SERVED = re.compile(r"\[server\] download tx \S+ done: status=finished .*\(([\d,]+) bytes\)")
_FETCHED = re.compile(r"\[client\] download ref=\S+ done: .*\(([\d,]+) bytes\)")


def transfers(server_log: str) -> dict:
    """Tensor payloads FLARE's download service moved, from the server's log.

    ``sent``: objects the server served (global model to each site); ``received``: objects it fetched (each
    site's update). Sizes are as FLARE logs them, in bytes.
    """
    out = {"sent": [], "received": []}
    if os.path.isfile(server_log):
        with open(server_log, encoding="utf-8", errors="replace") as f:
            for line in f:
                for key, pattern in (("sent", _SERVED), ("received", _FETCHED)):
                    match = pattern.search(line)
                    if match:
                        out[key].append(int(match.group(1).replace(",", "")))
    return out


def summarise(workspace: str, sites: Sequence[Site]) -> dict:
    """Per-site exchange records (``fl_exchange.json``), FLARE's logged transfers and the global model path."""
    out = {"sites": {}, "global_model": None, "server_transfers": {"sent": [], "received": []}}
    for s in sites:
        path = os.path.join(workspace, "sites", s.name, "fl_exchange.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out["sites"][s.name] = json.load(f)
    try:
        out["global_model"] = find_global_model(os.path.join(workspace, "sim"))
    except FileNotFoundError:
        pass
    sim = os.path.join(workspace, "sim")
    for root, _, files in os.walk(sim) if os.path.isdir(sim) else []:
        if os.path.basename(root) == "server" and "log.txt" in files:
            out["server_transfers"] = transfers(os.path.join(root, "log.txt"))
            break
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .client import DEFAULT_BUNDLE_ROOT

    workspace = os.path.abspath(args.workspace)
    if os.path.exists(workspace) and os.listdir(workspace):
        print(f"error: workspace {workspace} exists and is not empty; give a new folder", file=sys.stderr)
        return 2
    try:
        sites = sites_from_args(args)
        shared = parse_overrides(args.override, args.overrides_file)
        if args.rounds < 1 or args.local_epochs < 1:
            raise ValueError("--rounds and --local-epochs must be at least 1")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bundle_root = os.path.abspath(args.bundle_root or DEFAULT_BUNDLE_ROOT)
    fingerprint = None
    if args.exchange == "trainable" and not args.no_frozen_check:
        from .exchange import frozen_fingerprint
        from .model import build_bundle_network, config_value

        network = build_bundle_network(bundle_root, args.config, overrides=shared)
        if not config_value(bundle_root, args.config, "weights", shared):
            # the sites must share the frozen encoder: without pretrained weights, give them all this one start
            import torch

            os.makedirs(workspace, exist_ok=True)
            start_weights = os.path.join(workspace, "initial_weights.pt")
            torch.save({"model": network.state_dict()}, start_weights)
            shared["weights"] = start_weights
            logger.warning(
                "no 'weights' given: every site starts from %s (random encoder, for trying the job out)", start_weights
            )
        # 16 hex digits: enough to catch a different encoder, short enough not to look like a secret to FLARE
        fingerprint = frozen_fingerprint(network)[:16]
        del network
        logger.info("frozen encoder sha256 %s: every site must match it", fingerprint)
    recipe = make_recipe(
        sites,
        os.path.join(workspace, "sites"),
        num_rounds=args.rounds,
        shared_overrides=shared,
        bundle_root=bundle_root,
        config_file=args.config,
        exchange=args.exchange,
        local_epochs=args.local_epochs,
        on_site_error=args.on_site_error,
        validate=args.validate,
        frozen_sha256=fingerprint,
        record=os.path.join(workspace, "record") if args.record else None,
        num_threads=args.site_threads,
    )
    start = time.time()
    status = 0
    try:
        simulate(recipe, os.path.join(workspace, "sim"), sites, threads=args.threads)
    except RuntimeError as err:
        print(f"error: federated run failed: {err}", file=sys.stderr)
        status = 1
    summary = summarise(workspace, sites)
    if args.exchange == "trainable" and not args.no_frozen_check:
        prints = {n: r.get("frozen_sha256") for n, r in summary["sites"].items() if r.get("frozen_sha256")}
        if len(set(prints.values())) > 1:
            print(
                f"error: the sites' frozen encoders differ (sha256 per site: {prints}); the run is invalid",
                file=sys.stderr,
            )
            status = 1
    summary.update(
        {
            "rounds": args.rounds,
            "exchange": args.exchange,
            "on_site_error": args.on_site_error,
            "seconds": round(time.time() - start, 1),
            "failed": bool(status),
            "frozen_sha256": fingerprint,
        }
    )
    with open(os.path.join(workspace, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    for name, record in summary["sites"].items():
        if record.get("error"):
            print(f"{name}: FAILED: {record['error']}", file=sys.stderr)
        for r in record.get("rounds", []):
            print(
                f"{name} round {r['round']}: {r['num_steps']} steps, received {r['bytes_received'] / 2**20:.2f} MiB "
                f"({r['keys_received']} tensors), sent {r['bytes_sent'] / 2**20:.2f} MiB ({r['keys_sent']} tensors)"
            )
    moved = summary["server_transfers"]
    if moved["sent"] or moved["received"]:
        print(
            f"FLARE transfers: server sent {len(moved['sent'])} x, {sum(moved['sent']) / 2**20:.2f} MiB in all; "
            f"received {len(moved['received'])} x, {sum(moved['received']) / 2**20:.2f} MiB in all"
        )
    print(f"global model: {summary['global_model']}")
    print(f"summary: {os.path.join(workspace, 'summary.json')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
