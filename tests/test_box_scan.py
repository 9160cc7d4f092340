"""A click alone turned into a box (bundle.inferers.box_scan): the boxes tried, the stability rule, and the inferer
path (a click-only slice decoded with the chosen box, its session continued with that box)."""

from __future__ import annotations

import numpy as np
import torch
from constructed import BrightObjectNet

from bundle.inferers import InteractionSession, PromptedSliceInferer, SlicePrompt
from bundle.inferers.box_scan import SIDES, centred_boxes, consistency, pick_box, stability, tight_box


def disk_logits(shape, centre, radius, edge):
    """Logits of a disk that fall from +4 to -4 over ``edge`` pixels at its rim (a soft edge for a large ``edge``)."""
    a, b = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    distance = np.hypot(a - centre[0], b - centre[1]) - radius
    return np.clip(-distance * 8.0 / edge, -4.0, 4.0).astype(np.float32)


def test_centred_boxes_grow_around_the_click_and_stay_inside():
    boxes = centred_boxes((5, 50), scale=2.0, shape=(100, 120))
    assert len(boxes) == len(SIDES)
    for a0, b0, a1, b1 in boxes:
        assert 0 <= a0 <= 5 <= a1 < 100 and 0 <= b0 <= 50 <= b1 < 120
    sides = [b1 - b0 for _, b0, _, b1 in boxes]
    assert sides == sorted(sides) and sides[0] < 25 and sides[-1] > 60


def test_the_crisp_mask_wins_and_a_mask_that_misses_the_click_loses():
    shape, point = (64, 64), (32, 32)
    crisp = disk_logits(shape, point, 10, edge=1)
    soft = disk_logits(shape, point, 14, edge=12)
    elsewhere = disk_logits(shape, (8, 8), 6, edge=1)
    assert stability(crisp, point) > stability(soft, point) > 0
    assert stability(elsewhere, point) == -1.0
    best, mask = pick_box(torch.from_numpy(np.stack([soft, elsewhere, crisp])), point)
    assert best == 2 and mask[point] and mask.sum() == (crisp > 0).sum()
    _, none = pick_box(torch.from_numpy(elsewhere[None]), point)
    assert not none.any()


class ReachingNet(BrightObjectNet):
    """:class:`BrightObjectNet` whose box prompt reaches a quarter of the box's side beyond it, as SAM's masks
    spill past a box that cuts an object: a box inside an object gives a piece that its own tight box grows."""

    def decode_low_res(self, features, boxes=None, **kwargs):
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32)
            reach = (boxes[:, 2:] - boxes[:, :2]) / 4
            boxes = torch.cat([boxes[:, :2] - reach, boxes[:, 2:] + reach], 1)
        return super().decode_low_res(features, boxes=boxes, **kwargs)


def test_tight_box_and_consistency():
    mask = np.zeros((40, 50), bool)
    mask[10:20, 0:30] = True
    assert tight_box(mask, mask.shape) == (9, 0, 20, 32)  # a tenth of each extent (at least 1), clipped
    grown = mask.copy()
    grown[20:25, 0:30] = True
    assert consistency(mask, mask) == 1.0 and consistency(mask, grown) == 300 / 450


def test_of_the_masks_that_their_tight_boxes_give_back_the_most_stable_wins():
    shape, point = (64, 64), (32, 32)
    crisp = disk_logits(shape, point, 10, edge=1)
    soft = disk_logits(shape, point, 14, edge=12)
    logits = torch.from_numpy(np.stack([crisp, soft]))
    asked = []
    areas = [int((crisp > 0).sum()), int((soft > 0).sum())]

    def answers(flags):  # whether each mask comes back, told apart by their areas
        def comes_back(masks):
            asked.append([int(m.sum()) for m in masks])
            return [flags[areas.index(int(m.sum()))] for m in masks]

        return comes_back

    assert pick_box(logits, point, answers([False, True]))[0] == 1  # the crisper mask did not come back: a piece
    assert asked == [areas]  # asked most stable first
    assert pick_box(logits, point, answers([True, True]))[0] == 0
    assert pick_box(logits, point, answers([False, False]))[0] == 0  # none came back: the most stable of all


def test_a_click_in_an_object_gets_the_object_not_a_piece_cut_out_by_a_small_box():
    volume = np.full((60, 60, 1), 20.0, np.float32)
    volume[20:40, 15:35, 0] = 200.0
    net = ReachingNet()
    net.trained_prompts = ("box",)
    mask = PromptedSliceInferer(net).segment_slice(volume, 0, SlicePrompt(points=[(30, 25)], labels=[1]))
    np.testing.assert_array_equal(mask, volume[..., 0] > 100)  # every box is crisp here: stability ties


def test_a_click_alone_is_decoded_with_a_box_and_the_next_click_continues_it():
    volume = np.full((60, 60, 1), 20.0, np.float32)
    volume[20:40, 15:35, 0] = 200.0
    net = BrightObjectNet()
    net.trained_prompts = ("box",)  # box-trained, as LiteMedSAM
    inferer = PromptedSliceInferer(net)
    assert inferer.uses_box_scan()
    session = InteractionSession()
    first = inferer.segment_slice(volume, 0, SlicePrompt(points=[(30, 25)], labels=[1]), session=session)
    assert first[30, 25] and first.sum() > 50 and not first[:, 40:].any()
    state = session.get(-1, 0)
    assert state.box is None and state.decode_box is not None and state.clicks == ((30, 25, 1),)
    decoded = inferer.stats["decoded"]
    prompt = SlicePrompt(points=[(30, 25), (22, 17)], labels=[1, 1])
    second = inferer.segment_slice(volume, 0, prompt, session=session)
    assert inferer.stats["decoded"] == decoded + 1  # only the new click, with the chosen box
    a0, b0, a1, b1 = session.get(-1, 0).decode_box  # the chosen box, grown for the click outside it
    assert second[22, 17] and second[first].all() and a0 <= 22 <= a1 and b0 <= 17 <= b1
    # off: the click is a point prompt, as before
    plain = PromptedSliceInferer(net, box_scan=False)
    assert not plain.uses_box_scan()
    assert PromptedSliceInferer(BrightObjectNet()).uses_box_scan() is False  # weights of unknown training: off
    plain.segment_slice(volume, 0, SlicePrompt(points=[(30, 25)], labels=[1]))
    assert plain.stats["decoded"] == 1
