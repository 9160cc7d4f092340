"""Federated glue without the simulator: trainable-only exchange, FLModel <-> ExchangeObject, site checks, job export."""

import json
import os
from pathlib import Path

import pytest
import torch
from train_helpers import SMALL_ARCH

from bundle.fl.exchange import (
    FROZEN_VARS,
    exchange_to_flmodel,
    flmodel_to_exchange,
    frozen_fingerprint,
    split_keys,
    tensor_bytes,
    trainable_state_keys,
    wire_bytes,
)
from bundle.fl.filters import ExcludeFrozenWeights

REPO = Path(__file__).resolve().parents[1]
SMALL = SMALL_ARCH


@pytest.fixture(scope="module")
def small_net():
    from bundle.networks import SAMUNet

    torch.manual_seed(0)
    return SAMUNet("vit_tiny", conv_branch="resnet18")


def test_trainable_keys_are_everything_but_the_frozen_encoder(small_net):
    state = small_net.state_dict()
    sent, local = split_keys(state, FROZEN_VARS)
    assert set(sent) == set(trainable_state_keys(small_net))
    assert local and all(k.startswith("image_encoder.") for k in local)
    assert not any(k.startswith("image_encoder.") for k in sent)
    # every trainable parameter travels, and batch-norm statistics of the conv branch too
    trainable = {n for n, p in small_net.named_parameters() if p.requires_grad}
    assert trainable <= set(sent)
    assert any(k.startswith("conv_branch.") and k.endswith("running_mean") for k in sent)
    assert {k.split(".")[0] for k in sent} >= {"conv_branch", "adapters_in", "prompt_encoder", "mask_decoder"}


def test_exclude_frozen_filter(small_net):
    from monai.fl.utils.constants import WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    state = small_net.state_dict()
    data = ExchangeObject(
        weights=dict(state), weight_type=WeightType.WEIGHT_DIFF, statistics={"num_executed_iterations": 3}
    )
    out = ExcludeFrozenWeights()(data)
    assert set(out.weights) == set(trainable_state_keys(small_net))
    assert out.statistics == {"num_executed_iterations": 3}
    with pytest.raises(ValueError, match="excludes every weight"):
        ExcludeFrozenWeights(exclude_vars=".")(
            ExchangeObject(weights={"a": torch.zeros(1)}, weight_type=WeightType.WEIGHTS)
        )
    with pytest.raises(ValueError, match="ExchangeObject"):
        ExcludeFrozenWeights()({"a": 1})


def test_filters_config_is_what_monai_fl_parses():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "fl" / "config_filters.json"))
    filters = parser.get_parsed_content("post_weight_filters")
    assert len(filters) == 1 and isinstance(filters[0], ExcludeFrozenWeights)
    assert filters[0].exclude_vars == FROZEN_VARS


def test_trainable_part_is_the_server_model(small_net):
    from bundle.fl.model import TrainablePart

    part = TrainablePart(str(REPO), overrides=SMALL)
    net_keys = list(small_net.state_dict())
    assert list(part.state_dict()) == split_keys(net_keys)[0]
    full = TrainablePart(str(REPO), overrides=SMALL, exclude_vars=None)
    assert list(full.state_dict()) == net_keys
    with pytest.raises(ValueError, match="splits module"):
        TrainablePart(str(REPO), overrides=SMALL, exclude_vars=r"^mask_decoder\.transformer\.")
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        TrainablePart(str(REPO), config_file="configs/no_such.json", overrides=SMALL)


def test_frozen_fingerprint_tracks_only_the_encoder(small_net):
    import copy

    net = copy.deepcopy(small_net)
    before = frozen_fingerprint(net)
    assert before == frozen_fingerprint(small_net)
    with torch.no_grad():
        next(net.mask_decoder.parameters()).add_(1.0)
    assert frozen_fingerprint(net) == before
    with torch.no_grad():
        next(net.image_encoder.parameters()).add_(1.0)
    assert frozen_fingerprint(net) != before


def test_frozen_fingerprint_reads_zero_dim_buffers():
    """TinyViT's frozen BatchNorm layers (the default network) hold 0-dim int64 ``num_batches_tracked`` buffers."""
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(2))
    before = frozen_fingerprint(net, exclude_vars=".")
    net[0].num_batches_tracked.add_(1)
    assert frozen_fingerprint(net, exclude_vars=".") != before


def test_flmodel_exchange_object_bridge():
    from monai.fl.utils.constants import FlStatistics, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    received = flmodel_to_exchange(FLModel(params={"w": torch.ones(2)}, params_type=ParamsType.FULL, current_round=1))
    assert received.weight_type == WeightType.WEIGHTS and torch.equal(received.weights["w"], torch.ones(2))
    diff = flmodel_to_exchange(FLModel(params={"w": torch.ones(2).numpy()}, params_type=ParamsType.DIFF))
    assert diff.weight_type == WeightType.WEIGHT_DIFF and isinstance(diff.weights["w"], torch.Tensor)

    ex = ExchangeObject(
        weights={"w": torch.full((2,), 0.5)},
        weight_type=WeightType.WEIGHT_DIFF,
        statistics={FlStatistics.NUM_EXECUTED_ITERATIONS: 7},
    )
    sent = exchange_to_flmodel(ex, metrics={"val_mean_dice": 0.5}, meta={"site": "a"})
    assert sent.params_type == ParamsType.DIFF
    assert sent.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] == 7 and sent.meta["site"] == "a"
    assert sent.metrics == {"val_mean_dice": 0.5}
    ex.weight_type = WeightType.WEIGHTS
    assert exchange_to_flmodel(ex).params_type == ParamsType.FULL


def test_wire_bytes_counts_tensor_payloads(small_net):
    state = small_net.state_dict()
    raw = tensor_bytes(state)
    wire = wire_bytes(state)
    assert raw < wire < raw + 300 * len(state)  # data plus a small safetensors header per tensor
    sent, _ = split_keys(state)
    assert wire_bytes({k: state[k] for k in sent}) < wire


def _site_args(**kw):
    from bundle.fl.client import build_parser

    argv = []
    for key, value in kw.items():
        argv += [f"--{key}", str(value)]
    return build_parser().parse_args(argv)


def test_missing_datalist_names_site_and_file(tmp_path):
    from bundle.fl.client import SiteError, SiteRunner

    missing = tmp_path / "site7" / "image2label_train.json"
    runner = SiteRunner(_site_args(dataset_dir=tmp_path, train_json=missing, workdir=tmp_path / "w"), "site-7")
    with pytest.raises(
        SiteError, match=r"site site-7: datalist .*site7/image2label_train\.json \(train_json\) not found"
    ):
        runner.check_data(runner.overrides())
    # the default datalist id follows dataset_dir when only the folder is given
    runner = SiteRunner(_site_args(dataset_dir=tmp_path / "nowhere", workdir=tmp_path / "w"), "site-8")
    with pytest.raises(SiteError, match=r"site site-8: datalist .*nowhere/image2label_train\.json"):
        runner.check_data(runner.overrides())


def test_overrides_parsing(tmp_path):
    from bundle.fl.client import parse_overrides

    f = tmp_path / "o.json"
    f.write_text(json.dumps({"batch_size": 2, "network_def#backbone": "vit_b"}))
    out = parse_overrides(
        ["network_def#backbone=vit_tiny", "amp=false", "weights=/a/b.pt", "lr_milestones=[1,2]"], [str(f)]
    )
    assert out == {
        "batch_size": 2,
        "network_def#backbone": "vit_tiny",
        "amp": False,
        "weights": "/a/b.pt",
        "lr_milestones": [1, 2],
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["batch_size"])
    with pytest.raises(ValueError, match="JSON object"):
        f.write_text("[1]")
        parse_overrides([], [str(f)])


def _exported(recipe, job_dir):
    recipe.export(str(job_dir))
    configs = {}
    for path in Path(job_dir).rglob("config_fed_*.json"):
        configs.setdefault(path.parts[-3], {})[path.name] = json.loads(path.read_text())
    return configs


@pytest.mark.parametrize("on_site_error", ["abort", "continue"])
def test_recipe_per_site_datalists_and_error_policy(tmp_path, on_site_error):
    from bundle.fl.job import Site, make_recipe

    sites = [
        Site("hospital-a", dataset_dir=str(tmp_path / "a"), train_json=str(tmp_path / "a" / "train.json")),
        Site(
            "hospital-b",
            dataset_dir=str(tmp_path / "b"),
            train_json=str(tmp_path / "b" / "train.json"),
            overrides={"batch_size": 3},
        ),
    ]
    recipe = make_recipe(
        sites, str(tmp_path / "work"), num_rounds=3, shared_overrides=SMALL, on_site_error=on_site_error
    )
    configs = _exported(recipe, tmp_path / "job")
    text = json.dumps(configs)
    server = next(c["config_fed_server.json"] for c in configs.values() if "config_fed_server.json" in c)
    workflow = server["workflows"][0]["args"]
    assert workflow["num_rounds"] == 3 and workflow["ignore_result_error"] is (on_site_error == "continue")
    assert "bundle.fl.model.TrainablePart" in text
    clients = {name: json.dumps(c) for name, c in configs.items() if "config_fed_client.json" in c}
    for site in sites:
        args = next(t for name, t in clients.items() if site.name in name)
        assert site.train_json in args and f"--workdir {tmp_path / 'work' / site.name}" in args
        assert (
            "--override network_def#backbone=vit_tiny" in args and "--override network_def#conv_branch=resnet18" in args
        )
        assert ("--override batch_size=3" in args) is (site.name == "hospital-b")
        assert f"--on_site_error {on_site_error}" in args
        assert "--bundle_root" not in args  # each site uses the bundle installed there


def test_override_arguments_survive_flare_splitting():
    from nvflare.app_common.executors.task_script_runner import split_command_preserving_secret_refs

    from bundle.fl.client import parse_overrides
    from bundle.fl.job import Site, site_train_args

    overrides = {
        "network_def#backbone": "vit_tiny",
        "amp": False,
        "lr_milestones": [1, 2],
        "weights": None,
        "lr": 0.001,
    }
    args = site_train_args(Site("a", train_json="/d/t.json"), "/w/a", overrides)
    argv = split_command_preserving_secret_refs(args, posix=False, group_secret_ref_quotes=False)
    pairs = [argv[i + 1] for i, token in enumerate(argv) if token == "--override"]
    assert parse_overrides(pairs) == overrides
    with pytest.raises(ValueError, match="whitespace or quotes"):
        site_train_args(Site("a"), "/w/a", {"weights": "/my models/x.pt"})
    with pytest.raises(ValueError, match="reads as JSON"):
        site_train_args(Site("a"), "/w/a", {"dataset": "12"})


def test_recipe_rejects_bad_input(tmp_path):
    from bundle.fl.job import Site, make_recipe

    with pytest.raises(ValueError, match="exchange"):
        make_recipe([Site("a")], str(tmp_path), exchange="some")
    with pytest.raises(ValueError, match="on_site_error"):
        make_recipe([Site("a")], str(tmp_path), on_site_error="retry")
    with pytest.raises(ValueError, match="unique"):
        make_recipe([Site("a"), Site("a")], str(tmp_path))
    with pytest.raises(ValueError, match="site name"):
        Site("a b")
    with pytest.raises(ValueError, match="whitespace"):
        make_recipe([Site("a", train_json=str(tmp_path / "my data" / "t.json"))], str(tmp_path))


def test_simulate_cli_input_errors(tmp_path, capsys):
    from bundle.fl.simulate import main

    assert main(["--workspace", str(tmp_path / "ws")]) == 2
    assert "no sites" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["--data", str(tmp_path), "--workspace", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (
        main(["--data", str(tmp_path), "--data", str(tmp_path), "--sites", "3", "--workspace", str(tmp_path / "ws")])
        == 2
    )
    assert "--sites 3 but 2 site(s)" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "--sites", "2", "--workspace", str(tmp_path / "ws")]) == 2
    assert "no image2label_train.json to split between 2 sites" in capsys.readouterr().err


def test_transfers_read_from_flare_log(tmp_path):
    from bundle.fl.simulate import transfers

    log = tmp_path / "log.txt"
    log.write_text(
        "2026 - _Transaction - INFO - [server] download tx T1 done: status=finished elapsed=4.69s size=112.0MB (117,486,512 bytes)\n"
        "2026 - function - INFO - [client] download ref=abc done: elapsed=0.95s size=1.0MB (1,048,576 bytes)\n"
        "2026 - Cell - INFO - unrelated line (12 bytes)\n"
    )
    assert transfers(str(log)) == {"sent": [117486512], "received": [1048576]}
    assert transfers(str(tmp_path / "none.txt")) == {"sent": [], "received": []}


def test_one_folder_split_between_sites(tmp_path):
    from bundle.fl.simulate import split_sites

    data = tmp_path / "sa_med2d"
    data.mkdir()
    names = [f"images/mr_00--DS--{case}--z_{i:04d}.png" for case, i in (("caseA", 1), ("caseA", 2), ("caseB", 1))]
    (data / "image2label_train.json").write_text(
        json.dumps({n: [n.replace("images/", "masks/")[:-4] + "--0001_000.png"] for n in names})
    )
    sites = split_sites(str(data), 2, str(tmp_path / "lists"))
    assert [s.name for s in sites] == ["site-1", "site-2"]
    lists = [json.loads(Path(s.train_json).read_text()) for s in sites]
    assert [sorted(Path(k).name for k in lst) for lst in lists] == [
        ["mr_00--DS--caseA--z_0001.png", "mr_00--DS--caseA--z_0002.png"],
        ["mr_00--DS--caseB--z_0001.png"],
    ]
    assert all(os.path.isabs(k) and all(os.path.isabs(m) for m in v) for lst in lists for k, v in lst.items())
    assert sites[0].val_json == str(data / "label2image_validation.json")
    assert [
        len(json.loads(Path(s.train_json).read_text())) for s in split_sites(str(data), 3, str(tmp_path / "l3"))
    ] == [1, 1, 1]
    with pytest.raises(ValueError, match="cannot be split between 4 sites"):
        split_sites(str(data), 4, str(tmp_path / "l4"))
    with pytest.raises(ValueError, match="no image2label_train.json"):
        split_sites(str(tmp_path), 2, str(tmp_path / "l5"))
