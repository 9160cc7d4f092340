"""Corrective clicks: click rules, interaction sessions (stateful == replayed), mask feedback and the protocol's click
placement. Constructed networks, no trained weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from constructed import BrightObjectNet, ClickFollowingNet

from bundle.inferers import InteractionSession, PromptedSliceInferer, SessionStore, plan_prompts
from bundle.inferers.corrections import drop_rejected_components, grow_box, merge_click
from bundle.transforms import protocol_click

SHAPE = (70, 110, 20)


def blobs(shape=SHAPE, object_centre=(30, 60, 10), radius=12, distractor=(30, 96, 10), distractor_radius=5):
    """A bright ellipsoid (the object) and a small bright blob beside it (a distractor), slices along the last axis."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)

    def ball(centre, r):
        return np.sqrt((((grid - centre) * [1, 1, 2.0]) ** 2).sum(-1)) < r

    obj, other = ball(object_centre, radius), ball(distractor, distractor_radius)
    return np.where(obj | other, 200.0, 20.0).astype(np.float32), obj, other


@pytest.fixture(scope="module")
def scene():
    return blobs()


# ---------------------------------------------------------------------------------------------------- click rules
def test_merge_click_changes_only_the_clicked_region():
    previous = np.zeros((20, 20), bool)
    previous[2:6, 2:6] = True  # kept
    candidate = np.zeros((20, 20), bool)
    candidate[10:13, 10:13] = True  # the clicked region
    candidate[0:2, 15:20] = True  # a change elsewhere (not connected to the click)
    added = merge_click(previous, candidate, (11, 11), 1)
    assert added[2:6, 2:6].all() and added[10:13, 10:13].all() and not added[0:2, 15:20].any()
    removed = merge_click(added, np.zeros((20, 20), bool) | previous, (11, 11), 0)
    np.testing.assert_array_equal(removed, previous)
    # a background click never takes more than half the mask (here the decoder dropped all of it)
    np.testing.assert_array_equal(merge_click(previous, np.zeros((20, 20), bool), (3, 3), 0), previous)
    assert not merge_click(previous, np.zeros((20, 20), bool), (3, 3), 0, max_change=1.0).any()


def test_background_click_the_decoder_ignored_removes_its_blob_unless_it_holds_foreground():
    previous = np.zeros((20, 20), bool)
    previous[2:6, 2:6] = True
    previous[10:14, 10:14] = True
    kept = previous.copy()  # the decoder did not change anything
    out = merge_click(previous, kept, (11, 11), 0, foreground=[(3, 3)])
    assert not out[10:14, 10:14].any() and out[2:6, 2:6].all()
    assert merge_click(previous, kept, (11, 11), 0, foreground=[(12, 12)]).sum() == previous.sum()


def test_grow_box_holds_foreground_clicks_outside():
    assert grow_box((10, 10, 20, 20), [(25, 15), (5, 30)], [1, 0], 2, (40, 40)) == (10, 10, 27, 20)
    assert grow_box((10, 10, 20, 20), [(5, 30)], [1], 2, (40, 40)) == (3, 10, 20, 32)
    assert grow_box((10, 10, 20, 20), [(15, 15)], [1], 2, (40, 40)) == (10, 10, 20, 20)
    assert grow_box((10, 10, 20, 20), [(39, 0)], [1], 5, (40, 40)) == (10, 0, 39, 20)


def test_rejected_components_go_whole_in_3d(scene):
    _, obj, other = scene
    mask = obj | other
    out = drop_rejected_components(mask, [((30, 96, 10), 0)])
    np.testing.assert_array_equal(out, obj)  # the distractor spans slices 8-12: all removed
    kept = drop_rejected_components(mask, [((30, 96, 10), 0), ((30, 97, 11), 1)])
    np.testing.assert_array_equal(kept, mask)  # it holds a foreground click


def test_protocol_click_is_deepest_point_of_largest_error_region():
    truth = np.zeros((30, 30, 10), bool)
    truth[5:25, 5:25, 2:8] = True
    pred = truth.copy()
    pred[5:25, 5:10, 2:8] = False  # a 5-voxel-thick miss
    pred[27:29, 27:29, 0:2] = True  # a smaller false positive
    index, label = protocol_click(pred, truth)
    assert label == 1 and 5 <= index[1] <= 9 and index[1] == 7 and 4 <= index[2] <= 5
    assert protocol_click(truth, truth) == (None, -1)
    deepest, label = protocol_click(np.zeros_like(truth), truth, spacing=(1, 1, 5))
    assert label == 1 and deepest[:2] in ((14, 14), (14, 15), (15, 14), (15, 15))
    with pytest.raises(ValueError, match="differs"):
        protocol_click(pred[..., :5], truth)


# ------------------------------------------------------------------------------------------------------- inferer
def partial_box(k0=9, k1=11):
    return [18, 48, k0, 30, 104, k1]  # the object's upper rows only, and the distractor


def test_local_merge_keeps_what_a_click_did_not_touch(scene):
    volume, obj, other = scene
    plan = plan_prompts(SHAPE, box=partial_box(), points=[[38, 60, 10]], point_labels=[1])
    replace = PromptedSliceInferer(ClickFollowingNet(spill=True), click_merge="replace", grow_box=False)
    replaced, _ = replace.segment_volume(volume, plan)
    local, _ = PromptedSliceInferer(ClickFollowingNet(spill=True), click_merge="local", grow_box=False).segment_volume(
        volume, plan
    )
    assert replaced[0, 0, 10] and not local[0, 0, 10]  # the spill far from the click is rejected
    assert local[..., 10][obj[..., 10]].all()  # the clicked object is completed on its slice


@pytest.mark.parametrize("merge, feedback", [("local", False), ("replace", True), ("local", True)])
def test_session_applies_only_new_clicks_and_equals_replay(scene, merge, feedback):
    volume, obj, other = scene
    clicks = [([38, 60, 10], 1), ([27, 96, 10], 0), ([20, 60, 9], 1)]
    options = {"click_merge": merge, "mask_feedback": feedback, "grow_box": False}  # a grown box is a new box
    stateful = PromptedSliceInferer(ClickFollowingNet(spill=True), **options)
    session = InteractionSession()
    for n in range(len(clicks) + 1):
        points = [p for p, _ in clicks[:n]] or None
        labels = [lab for _, lab in clicks[:n]] or None
        plan = plan_prompts(SHAPE, box=partial_box(), points=points, point_labels=labels)
        before = stateful.stats["decoded"]
        mask, _ = stateful.segment_volume(volume, plan, image_id="case", session=session)
        assert stateful.stats["decoded"] - before == (3 if n == 0 else 1)  # 3 box slices, then the new click only
    replay = PromptedSliceInferer(ClickFollowingNet(spill=True), **options)
    again, _ = replay.segment_volume(volume, plan, image_id="case")
    np.testing.assert_array_equal(mask, again)
    assert replay.stats["decoded"] == 3 + len(clicks)  # replayed click by click from the boxes
    assert not mask[..., 10][other[..., 10]].any()  # the background click removed the distractor there


def test_session_restarts_a_slice_whose_box_changed(scene):
    volume, *_ = scene
    inferer = PromptedSliceInferer(ClickFollowingNet(), click_merge="local", grow_box=False)
    session = InteractionSession()
    plan = plan_prompts(SHAPE, box=partial_box(), points=[[38, 60, 10]], point_labels=[1])
    inferer.segment_volume(volume, plan, image_id="case", session=session)
    before = inferer.stats["decoded"]
    moved = [18, 40, 9, 30, 104, 11]
    inferer.segment_volume(
        volume, plan_prompts(SHAPE, box=moved, points=[[38, 60, 10]], point_labels=[1]), "case", session
    )
    assert inferer.stats["decoded"] - before == 4  # every slice from its new box, then the click again
    assert session.get(2, 10).box == (18, 40, 30, 104)


def test_mask_feedback_sends_the_previous_low_res_logits(scene):
    volume, *_ = scene
    net = ClickFollowingNet()
    inferer = PromptedSliceInferer(net, mask_feedback=True, grow_box=False)
    session = InteractionSession()
    box = [18, 48, 10, 30, 104, 10]
    inferer.segment_volume(volume, plan_prompts(SHAPE, box=box), "case", session)
    previous = session.get(2, 10).low_res.float()
    plan = plan_prompts(SHAPE, box=box, points=[[38, 60, 10]], point_labels=[1])
    inferer.segment_volume(volume, plan, "case", session)
    assert torch.equal(net.mask_inputs_seen[-1][0], previous)
    assert net.mask_inputs_seen[0] is None  # the box decode has no mask to feed
    off = ClickFollowingNet()
    PromptedSliceInferer(off).segment_volume(volume, plan)  # "auto": no trained_prompts, no feedback
    assert all(m is None for m in off.mask_inputs_seen)


def test_remove_components_drops_a_rejected_blob_on_every_slice(scene):
    volume, obj, other = scene
    box = [15, 45, 6, 45, 104, 14]  # object and distractor
    plan = plan_prompts(SHAPE, box=box, points=[[30, 96, 10]], point_labels=[0])
    kept, _ = PromptedSliceInferer(BrightObjectNet(), click_merge="replace").segment_volume(volume, plan)
    assert kept[other].all()  # the box-only network ignores the click
    inferer = PromptedSliceInferer(BrightObjectNet(), click_merge="replace", remove_components=True)
    mask, results = inferer.segment_volume(volume, plan)
    np.testing.assert_array_equal(mask, obj & (np.arange(SHAPE[2]) >= 6) & (np.arange(SHAPE[2]) <= 14))
    assert sum(r.area for r in results) == int(mask.sum())


def test_foreground_click_outside_the_box_grows_it(scene):
    volume, obj, _ = scene
    plan = plan_prompts(SHAPE, box=[18, 48, 10, 30, 72, 10], points=[[40, 60, 10]], point_labels=[1])
    grown, results = PromptedSliceInferer(BrightObjectNet()).segment_volume(volume, plan)
    assert grown[40, 60, 10] and results[0].box[2] >= 40
    fixed, _ = PromptedSliceInferer(BrightObjectNet(), grow_box=False).segment_volume(volume, plan)
    assert not fixed[40, 60, 10]


def test_click_beyond_the_box_slice_range():
    plan = plan_prompts(SHAPE, box=[18, 48, 8, 30, 72, 10], points=[[25, 60, 12]], point_labels=[1])
    assert sorted(plan.seeds) == [8, 9, 10, 11, 12] and plan.seeds[11].box == (18, 48, 30, 72)
    assert plan.seeds[12].points == [(25, 60)]
    with pytest.raises(ValueError, match="background click .* outside the box's slice range"):
        plan_prompts(SHAPE, box=[18, 48, 8, 30, 72, 10], points=[[25, 60, 14]], point_labels=[0])


def test_background_click_corrects_a_propagated_slice(scene):
    volume, obj, _ = scene
    plan = plan_prompts(SHAPE, points=[[30, 60, 10], [30, 60, 13]], point_labels=[1, 0])
    # the decoder's mask for the box and the click (a local merge would not remove the whole mask of a slice)
    mask, results = PromptedSliceInferer(ClickFollowingNet(), click_merge="replace").segment_volume(volume, plan)
    np.testing.assert_array_equal(mask[..., 7:13], obj[..., 7:13])
    assert not mask[..., 13:].any()  # the correction emptied slice 13, so propagation stopped there
    corrected = next(r for r in results if r.index == 13)
    assert corrected.propagated and corrected.labels == [0] and corrected.stopped == "vanished"


def test_clicks_alone_start_on_the_first_foreground_click_and_correct_other_slices(scene):
    volume, obj, _ = scene
    plan = plan_prompts(SHAPE, points=[[30, 60, 10], [30, 60, 13], [30, 60, 9]], point_labels=[1, 1, 1])
    assert plan.anchor == 10 and plan_prompts(SHAPE, box=[18, 48, 8, 30, 72, 10]).anchor is None
    mask, results = PromptedSliceInferer(BrightObjectNet()).segment_volume(volume, plan)
    np.testing.assert_array_equal(mask, obj)
    by_slice = {r.index: r for r in results}
    assert not by_slice[10].propagated  # the object starts where the first foreground click is
    for k in (9, 13):  # the later clicks correct what propagation from it brings to their slices
        assert by_slice[k].propagated and by_slice[k].points == [(30, 60)] and by_slice[k].box is not None
    # the same with a slice box: the object starts on the box's slice
    plan = plan_prompts(SHAPE, slice_box=[18, 48, 42, 72], slice_index=10, points=[[30, 60, 13]], point_labels=[1])
    mask, results = PromptedSliceInferer(BrightObjectNet()).segment_volume(volume, plan)
    np.testing.assert_array_equal(mask, obj)
    assert next(r for r in results if r.index == 13).propagated


def test_a_foreground_click_beyond_where_propagation_stopped_starts_the_object_again():
    volume, obj, _ = blobs()
    volume[..., 12:14] = 20.0  # the object is cut: slices 12 and 13 are empty
    truth = obj.copy()
    truth[..., 12:14] = False
    plan = plan_prompts(SHAPE, points=[[30, 60, 10], [30, 60, 15]], point_labels=[1, 1])
    mask, results = PromptedSliceInferer(BrightObjectNet()).segment_volume(volume, plan)
    np.testing.assert_array_equal(mask, truth)  # both parts: the front vanished at 12, the click on 15 restarted it
    restarted = next(r for r in results if r.index == 15)
    assert not restarted.propagated and restarted.points == [(30, 60)]
    # the same below the start: going down, the front vanishes at 13, the click on 8 restarts it, upwards again to 11
    volume, obj, _ = blobs()
    volume[..., 11:13] = 20.0
    truth = obj.copy()
    truth[..., 11:13] = False
    plan = plan_prompts(SHAPE, points=[[30, 60, 14], [30, 60, 8]], point_labels=[1, 1])
    mask, _ = PromptedSliceInferer(BrightObjectNet()).segment_volume(volume, plan)
    np.testing.assert_array_equal(mask, truth)


def test_bad_click_settings():
    with pytest.raises(ValueError, match="click_merge"):
        PromptedSliceInferer(BrightObjectNet(), click_merge="union")
    with pytest.raises(ValueError, match="mask_feedback"):
        PromptedSliceInferer(BrightObjectNet(), mask_feedback="yes")


# ------------------------------------------------------------------------------------------------ session store
def test_session_store_keeps_images_and_objects_apart():
    store = SessionStore(max_bytes=1 << 20)
    from bundle.inferers import SliceState

    for image in ("a", "b"):
        for obj in (1, 2):
            session = store.get(image, obj)
            assert len(session) == 0
            mask = np.zeros((8, 8), bool)
            mask[0, ord(image) - ord("a") + 2 * (obj - 1)] = True
            session.put(2, 0, SliceState.create(None, ((0, 0, 1),), mask, None))
            assert store.put(image, obj, session)
    for image in ("b", "a"):
        for obj in (2, 1):
            state = store.get(image, obj).get(2, 0)
            assert np.flatnonzero(state.mask).tolist() == [ord(image) - ord("a") + 2 * (obj - 1)]
    assert len(store) == 0  # get hands the session out; put it back after the request


def test_session_store_budget_expiry_and_reset():
    now = [0.0]
    from bundle.inferers import SliceState

    store = SessionStore(max_bytes=40_000, ttl_s=10, timer=lambda: now[0])

    def session_of(n_slices):
        session = InteractionSession()
        for k in range(n_slices):
            session.put(2, k, SliceState.create((0, 0, 5, 5), (), np.ones((64, 64), bool), torch.zeros(1, 64, 64)))
        return session

    assert session_of(1).nbytes > 8192
    for n in range(6):
        store.put("img", n, session_of(1))
        assert store.nbytes <= 40_000
    assert 0 < len(store) < 6  # the least recently used went
    assert not store.put("img", "huge", session_of(10))  # larger than the whole budget: not kept
    store.put("other", 0, session_of(1))
    assert store.reset("img") >= 1 and len(store) == 1
    now[0] = 11.0
    assert len(store) == 0  # expired
