"""MONAI Label request fields -> prompt plans (bundle.label.requests); needs no MONAI Label and no network."""

import numpy as np
import pytest

from bundle.label.requests import RequestError, RequestLimits, parse_request

SHAPE = (96, 80, 8)


def test_slicer_roi_in_2d_mode_segments_one_slice_with_its_box():
    parsed = parse_request({"roi": [59, 36, 35, 60, 2, 4], "slice": 3}, SHAPE)  # Slicer may flip a pair
    assert parsed.mode == "2d" and parsed.slice_index == 3 and parsed.boxes == [[36, 35, 2, 59, 60, 4]]
    (plan,) = parsed.plans
    assert list(plan.seeds) == [3] and plan.seeds[3].box == (36, 35, 59, 60) and not plan.propagate


def test_roi_without_slice_uses_its_middle_and_clicks_choose_the_slice():
    assert parse_request({"roi": [10, 20, 10, 20, 2, 6]}, SHAPE).slice_index == 4
    parsed = parse_request(
        {"roi": [10, 20, 10, 20, 2, 6], "foreground": [[15, 15, 5]], "background": [[11, 11, 5], [12, 12, 2]]}, SHAPE
    )
    seed = parsed.plans[0].seeds[5]
    assert parsed.slice_index == 5 and seed.points == [(15, 15), (11, 11)] and seed.labels == [1, 0]


def test_click_only_2d_and_3d_modes():
    parsed = parse_request({"foreground": [40, 30, 4]}, SHAPE)  # one click given flat
    assert parsed.plans[0].seeds[4].points == [(40, 30)] and not parsed.plans[0].propagate
    parsed = parse_request({"foreground": [[40, 30, 4]], "mode": "3d"}, SHAPE)
    assert parsed.plans[0].propagate and parsed.slice_index is None


def test_3d_box_seeds_every_slice_of_its_range_and_one_slice_box_propagates():
    parsed = parse_request({"roi": [10, 20, 10, 20, 2, 4], "mode": "3D"}, SHAPE)
    assert sorted(parsed.plans[0].seeds) == [2, 3, 4] and not parsed.plans[0].propagate
    parsed = parse_request({"roi": [10, 20, 10, 20], "slice": 5, "mode": "3d"}, SHAPE)
    assert list(parsed.plans[0].seeds) == [5] and parsed.plans[0].propagate


def test_several_boxes_make_several_objects_and_clicks_join_their_box():
    parsed = parse_request({"roi": [[0, 9, 0, 9, 3, 3], [50, 60, 50, 60, 3, 3]], "foreground": [[55, 55, 3]]}, SHAPE)
    assert len(parsed.plans) == 2
    assert parsed.plans[0].seeds[3].points == [] and parsed.plans[1].seeds[3].points == [(55, 55)]


@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({}, "no prompt"),
        ({"foreground": [[96, 0, 0]]}, "x=96 not in [0, 95]"),
        ({"foreground": [[0, -1, 0]]}, "outside the image"),
        ({"background": [[1, 1, 8]]}, "z=8 not in [0, 7]"),
        ({"roi": [0, 10, 0, 100, 0, 1]}, "outside the image"),
        ({"foreground": "abc"}, "foreground must be a list"),
        ({"foreground": [[1, 2]]}, "3 voxel indices"),
        ({"foreground": [["a", 1, 1]]}, "must hold numbers"),
        ({"roi": [1, 2, 3]}, "roi must be"),
        ({"roi": "box"}, "roi must be"),
        ({"foreground": [[1, 1, 1]], "slice": "x"}, "slice must be an integer"),
        ({"foreground": [[1, 1, 1]], "slice": 99}, "slice 99 lies outside"),
        ({"foreground": [[1, 1, 1]], "mode": "4d"}, "mode must be one of"),
        ({"background": [[1, 1, 1]]}, "only background clicks"),
        ({"foreground": [[1, 1, 1]], "slice": 2}, "no click on slice 2"),
        ({"roi": [0, 10, 0, 10, 0, 2], "slice": 5}, "outside the roi's z range"),
        ({"roi": [[0, 9, 0, 9, 3, 3], [50, 60, 50, 60, 3, 3]], "foreground": [[30, 30, 3]]}, "none of the 2 boxes"),
    ],
)
def test_bad_requests_raise_request_error_naming_the_problem(request_fields, message):
    with pytest.raises(RequestError, match=None) as info:
        parse_request(request_fields, SHAPE)
    assert message in str(info.value) and 400 <= info.value.status < 500


# ---------------------------------------------------------------------------------------------- labels and objects
LABELS = {"tumour": 1, "organ": 2}


def test_one_label_request_is_answered_as_a_0_1_mask_named_by_its_label():
    parsed = parse_request({"roi": [10, 20, 10, 20, 3, 3]}, SHAPE, labels=LABELS)
    assert not parsed.label_map and parsed.labels == [1] and parsed.label_names == {"tumour": 1}
    parsed = parse_request({"roi": [10, 20, 10, 20, 3, 3], "label": "organ"}, SHAPE, labels=LABELS)
    assert parsed.labels == [1] and parsed.label_names == {"organ": 1}  # Slicer: value 1 -> the selected segment
    assert parse_request({"foreground": [[5, 5, 3]], "label": 2}, SHAPE, labels=LABELS).label_names == {"organ": 1}
    # a segment the user made in Slicer: its name, value 1
    parsed = parse_request({"foreground": [[5, 5, 3]], "label": "Segment_1"}, SHAPE, labels=LABELS)
    assert parsed.label_names == {"Segment_1": 1}


def test_objects_name_the_label_of_each_box_and_answer_a_label_map():
    request = {
        "objects": [
            {"roi": [10, 20, 10, 20, 2, 4], "label": "organ"},
            {"roi": [50, 60, 50, 60, 3, 3], "foreground": [[55, 55, 3]], "label": "tumour"},
        ],
        "mode": "3d",
    }
    parsed = parse_request(request, SHAPE, labels=LABELS)
    assert parsed.label_map and parsed.labels == [2, 1] and parsed.label_names == {"tumour": 1, "organ": 2}
    assert sorted(parsed.plans[0].seeds) == [2, 3, 4] and parsed.plans[1].propagate
    assert parsed.plans[1].seeds[3].points == [(55, 55)]


def test_label_upload_is_a_mask_prompt_of_each_label():
    mask = np.zeros(SHAPE, np.uint16)
    mask[10:20, 12:18, 2:4] = 1
    mask[50:60, 50:58, 5] = 2
    parsed = parse_request({"mode": "3d"}, SHAPE, labels=LABELS, mask=mask)
    assert parsed.label_map and parsed.labels == [1, 2] and all(plan.propagate for plan in parsed.plans)
    assert sorted(parsed.plans[0].seeds) == [2, 3] and parsed.plans[0].seeds[2].box == (10, 12, 19, 17)
    parsed = parse_request({"slice": 2}, SHAPE, labels=LABELS, mask=mask)  # 2d: the slice only
    assert parsed.labels == [1] and list(parsed.plans[0].seeds) == [2] and not parsed.plans[0].propagate
    one = (mask == 1).astype(np.uint16)
    parsed = parse_request({"foreground": [[12, 14, 2]], "mode": "3d"}, SHAPE, labels=LABELS, mask=one)
    assert parsed.plans[0].seeds[2].points == [(12, 14)] and parsed.plans[0].seeds[2].box == (10, 12, 19, 17)


@pytest.mark.parametrize(
    "fields, mask, message",
    [
        ({"roi": [1, 5, 1, 5, 1, 1], "label": 7}, None, "label 7 is not one of the server's labels"),
        ({"objects": [{"roi": [1, 5, 1, 5, 1, 1], "label": "bone"}]}, None, "label 'bone' is not one of the server"),
        ({"objects": [{"roi": [1, 5, 1, 5, 1, 1]}]}, None, "objects[0]: no label"),
        ({"objects": [{"roi": [1, 5, 1, 5, 1, 1], "label": "tumour", "colour": 1}]}, None, "unknown fields"),
        ({"objects": [{"roi": [1, 500, 1, 5, 1, 1], "label": "tumour"}]}, None, "objects[0]: roi corner"),
        ({"objects": [], "roi": [1, 5, 1, 5, 1, 1]}, None, "either in objects or at the top level"),
        ({"objects": "all"}, None, "objects must be a non-empty list"),
        ({}, "three", "values [3] are not labels of the server"),
        ({"roi": [1, 5, 1, 5, 1, 1]}, "one", "a roi or a label upload"),
        ({"foreground": [[12, 14, 2]]}, "two", "clicks need a single-label upload"),
    ],
)
def test_bad_labels_objects_and_uploads(fields, mask, message):
    masks = {"one": np.zeros(SHAPE, np.uint16), "two": np.zeros(SHAPE, np.uint16), "three": np.zeros(SHAPE, np.uint16)}
    masks["one"][1:3, 1:3, 2] = 1
    masks["two"][1:3, 1:3, 2], masks["two"][5:7, 5:7, 2] = 1, 2
    masks["three"][1:3, 1:3, 2] = 3
    with pytest.raises(RequestError) as info:
        parse_request(fields, SHAPE, labels=LABELS, mask=masks.get(mask))
    assert message in str(info.value) and info.value.status == 400


@pytest.mark.parametrize(
    "labels, message",
    [({"a": 1, "b": 3}, "must be 1..2"), ({"a": 0}, "must be 1..1"), ({"": 1}, "non-empty"), ([1], "JSON object")],
)
def test_label_configuration_must_be_one_to_n(labels, message):
    from bundle.label.requests import check_label_names

    with pytest.raises(ValueError, match=message):
        check_label_names(labels)
    assert check_label_names({"organ": 2, "tumour": 1}) == {"tumour": 1, "organ": 2}


def test_prompt_limits_answer_413_and_count_what_the_network_would_serve():
    limits = RequestLimits(max_clicks_per_slice=3, max_boxes=2)
    box = [10, 20, 10, 20, 2, 4]
    clicks = [[12, 12, 3], [13, 13, 3], [14, 14, 3]]
    assert len(parse_request({"roi": box, "foreground": clicks}, SHAPE, limits=limits).plans) == 1  # at the limit
    spread = clicks + [[15, 15, 2]]  # four clicks, but at most three on one slice
    assert parse_request({"foreground": spread, "mode": "3d"}, SHAPE, limits=limits).plans
    with pytest.raises(RequestError, match=r"4 clicks on slice z=3; at most 3 per slice") as error:
        parse_request({"roi": box, "foreground": clicks + [[16, 16, 3]]}, SHAPE, limits=limits)
    assert error.value.status == 413
    with pytest.raises(RequestError, match=r"3 boxes / objects in one request; at most 2") as error:
        parse_request({"roi": [box, box, box]}, SHAPE, limits=limits)
    assert error.value.status == 413
    objects = [{"roi": box, "label": "lesion"}, {"foreground": [[12, 12, 3]], "label": "lesion"}]
    assert len(parse_request({"objects": objects}, SHAPE, limits=limits).plans) == 2
    with pytest.raises(RequestError, match=r"3 boxes / objects") as error:
        parse_request({"objects": objects + objects[:1]}, SHAPE, limits=limits)
    # the defaults: 64 clicks per slice, 32 boxes
    many = [[10 + n % 8, 10 + n // 8, 3] for n in range(65)]
    with pytest.raises(RequestError, match="65 clicks on slice z=3; at most 64"):
        parse_request({"foreground": many}, SHAPE)
    with pytest.raises(RequestError, match="33 boxes / objects in one request; at most 32"):
        parse_request({"roi": [box] * 33}, SHAPE)
