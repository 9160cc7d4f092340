"""MONAI Label interaction sessions: the infer task keeps each image's and object's slice masks apart, equal to a
stateless replay, within their memory cap. In-process, with a constructed network (no server, no trained weights)."""

from __future__ import annotations

import numpy as np
import pytest
from constructed import ClickFollowingNet

from bundle.inferers import PromptedSliceInferer


def _task(tmp_path, network, session_bytes=1 << 26, **options):
    """The MONAI Label infer task serving ``network`` (a constructed one) through its inferer."""
    from bundle.label.infer import SAMUNetInferTask

    task = SAMUNetInferTask(tmp_path / "none.pt", preload=False, labels={"a": 1, "b": 2}, session_bytes=session_bytes)
    task._inferer = PromptedSliceInferer(network, click_merge="local", grow_box=False, **options)
    task._weights_stamp = task._current_source()[1]
    return task


def _scans(tmp_path):
    import nibabel as nib
    from constructed import two_spheres

    paths = []
    for n, centres in enumerate((((20, 30, 8), (44, 66, 8)), ((24, 36, 8), (40, 70, 8)))):
        volume, _ = two_spheres(centres=centres)
        hu = np.where(volume > 100, 300, -800).astype(np.int16)
        paths.append(str(tmp_path / f"scan{n}.nii.gz"))
        nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), paths[-1])
    return paths


def test_task_sessions_keep_images_and_objects_apart_and_equal_stateless_replay(tmp_path):
    import nibabel as nib

    scans = _scans(tmp_path)
    stateful = _task(tmp_path, ClickFollowingNet(spill=True))
    stateless = _task(tmp_path, ClickFollowingNet(spill=True), session_bytes=0)
    boxes = {"a": [12, 28, 22, 38, 5, 11], "b": [36, 52, 58, 74, 5, 11]}  # [x0, x1, y0, y1, z0, z1]
    steps = [(0, None), (1, None), (0, ("a", [20, 37, 8], 0)), (1, ("b", [44, 70, 8], 1)), (0, ("b", [44, 66, 9], 1))]
    steps += [(1, ("a", [24, 36, 7], 1)), (0, ("a", [20, 30, 6], 1))]
    history = {0: {"a": [], "b": []}, 1: {"a": [], "b": []}}
    seen = set()
    for image, click in steps:
        clicks = history[image]
        if click is not None:
            clicks[click[0]].append((click[1], click[2]))
        objects = [
            {
                "label": name,
                "roi": boxes[name],
                "foreground": [p for p, label in clicks[name] if label == 1],
                "background": [p for p, label in clicks[name] if label == 0],
            }
            for name in ("a", "b")
        ]
        request = {"image": scans[image], "objects": objects, "mode": "3d", "modality": "ct"}
        out, result = stateful(dict(request))
        again, replayed = stateless(dict(request))
        np.testing.assert_array_equal(nib.load(out).get_fdata(), nib.load(again).get_fdata())
        # only the new click is decoded (after each box's 7 slices once); the replay decodes every click again
        assert result["decoded_slices"] == (14 if click is None else 1), (image, click, result["decoded_slices"])
        assert replayed["decoded_slices"] == 14 + sum(len(c) for c in clicks.values())
        seen.add(image)
        assert result["sessions"]["objects"] == 2 * len(seen)  # one session per image and object
    # a new box for one object restarts its session; reset_state drops the image's sessions
    objects[0]["roi"] = [12, 28, 22, 38, 6, 10]
    _, result = stateful({**request, "objects": objects})
    assert result["decoded_slices"] == 5 + len(clicks["a"]) + 0  # object a from its new box; b as it was
    _, result = stateful({**request, "objects": objects, "reset_state": True})
    assert (
        result["decoded_slices"] == 5 + 7 + sum(len(c) for c in clicks.values()) and result["sessions"]["objects"] == 4
    )
    with pytest.raises(ValueError, match="reset_state"):
        stateful({**request, "reset_state": "later"})


def test_task_sessions_stay_within_their_memory_cap(tmp_path):
    scans = _scans(tmp_path)
    cap = 2_500_000  # two sessions of 7-8 slices (the constructed network's low-res logits are 256 x 256)
    task = _task(tmp_path, ClickFollowingNet(), session_bytes=cap)
    for n in range(6):
        roi = [12, 28, 22, 38, 4 + n % 3, 11]
        label = "ab"[n // 2 % 2]  # four (image, object) keys
        request = {"image": scans[n % 2], "roi": roi, "foreground": [[20, 30, 8]], "label": label, "mode": "3d"}
        _, result = task({**request, "modality": "ct"})
        assert task.sessions.nbytes <= cap and result["sessions"]["mib"] <= cap / 2**20
        assert result["sessions"]["objects"] == min(n + 1, 2)  # the least recently used go


def test_task_answers_are_compressed_unless_the_request_says_not(tmp_path):
    import itk

    scan = _scans(tmp_path)[0]
    task = _task(tmp_path, ClickFollowingNet())
    request = {"image": scan, "roi": [12, 28, 22, 38, 7, 9], "mode": "3d", "modality": "ct"}
    answers = {}
    for compress in (None, True, False, "false"):
        ask = {**request, "result_extension": ".nrrd"} | ({} if compress is None else {"result_compress": compress})
        out, result = task(ask)
        with open(out, "rb") as f:
            header = f.read(1000).split(b"\n\n")[0]
        answers[compress] = (header, itk.array_from_image(itk.imread(out)))
        assert result["voxels"] == int(answers[compress][1].sum()) > 0
    assert b"encoding: gzip" in answers[None][0] and b"encoding: gzip" in answers[True][0]  # the default
    assert b"encoding: raw" in answers[False][0] and b"encoding: raw" in answers["false"][0]
    for header, array in answers.values():
        np.testing.assert_array_equal(array, answers[None][1])
    with pytest.raises(ValueError, match="result_compress must be true or false"):
        task({**request, "result_compress": "sometimes"})
