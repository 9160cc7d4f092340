"""MONAI Label request fields -> validated prompt plans for :class:`bundle.inferers.PromptedSliceInferer`.

MONAI Label clients (3D Slicer, OHIF, ``monailabel.client``) send prompts as voxel indices ``[x, y, z]`` of the image
as the server loads it (ITK / nibabel index order, which is also ``LoadImage``'s array order ``[i, j, k]``):

- ``foreground`` / ``background``: lists of clicks ``[x, y, z]`` (a single click may be given flat);
- ``roi``: a box in 3D Slicer's format ``[x0, x1, y0, y1, z0, z1]`` (inclusive voxel bounds, each pair in either
  order, as Slicer's RAS -> IJK conversion may flip them), or ``[x0, x1, y0, y1]`` on one slice, or a list of boxes;
- ``slice``: the slice index ``z`` to segment in 2D mode (default: the slice of the last foreground click, else of
  the last background click, else the middle of the box);
- ``mode``: ``"2d"`` (segment one slice; the interactive default) or ``"3d"`` (a box segments every slice of its z
  range; clicks or a one-slice box propagate slice by slice through the volume);
- ``label``: the name (or value) of the label these prompts segment (3D Slicer sends its selected segment's name);
- ``objects``: several named objects in one request, each ``{"roi": ..., "foreground": ..., "background": ...,
  "label": name}``, answered with one label map;
- an uploaded ``label`` file (MONAI Label's ``/infer`` form field; it reaches the task as a path) is a mask prompt:
  each of its labels is an object, prompted on every slice it covers by its box there, propagated beyond them in 3d
  mode (see :mod:`bundle.inferers.mask_prompts`).

A request for one label is answered with a 0/1 mask and ``label_names`` ``{name: 1}``: 3D Slicer puts a Deepgrow
answer's value 1 into the selected segment. A request with ``objects`` or a label upload is answered with a label
map holding the configured label values and ``label_names`` the configured ``{name: value}``; the values are 1..N,
because Slicer imports a label map's value n into the n-th name of ``label_names`` sorted by value.

Every problem raises :class:`RequestError` (a ``ValueError``) whose message names the field and the value; a request
with more boxes / objects or more clicks on one slice than :class:`RequestLimits` allow is refused with status 413
before any inference, so one request cannot hold the server for minutes.
This module does not import MONAI Label, so it is usable (and testable) without the ``label`` extra.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bundle.inferers.mask_prompts import label_values, mask_plan
from bundle.inferers.volume_prompts import PromptPlan, SlicePrompt, is_whole_number, plan_prompts

MODES = ("2d", "3d")
AXIS = 2  # slices are taken along z, the third voxel index: what Slicer / OHIF clicks carry
KNOWN_FIELDS = ("foreground", "background", "roi", "slice", "mode", "label", "objects")
PROMPT_FIELDS = ("foreground", "background", "roi")
OBJECT_FIELDS = PROMPT_FIELDS + ("label",)
#: the label the app serves unless its ``--conf labels`` says otherwise
DEFAULT_LABELS = {"lesion": 1}


class RequestError(ValueError):
    """A request that cannot be served; ``status`` is the HTTP status to answer with (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestLimits:
    """The most prompts one request may carry (the app's ``--conf max_clicks_per_slice`` and ``max_boxes``)."""

    max_clicks_per_slice: int = 64
    max_boxes: int = 32  # boxes and objects of one request, together


@dataclass
class InteractiveRequest:
    """A parsed request: one prompt plan per object (one per box; clicks join the box that holds them), each with
    the label value it is written with; ``label_map`` says whether the answer is a label map (``objects`` or a label
    upload) or a 0/1 mask; ``label_names`` is the answer's ``{name: value}``."""

    plans: list[PromptPlan]
    mode: str
    slice_index: int | None
    clicks: list[tuple[list[int], int]] = field(default_factory=list)
    boxes: list[list[int]] = field(default_factory=list)  # [x0, y0, z0, x1, y1, z1], inclusive, sorted
    labels: list[int] = field(default_factory=list)  # per plan
    label_map: bool = False
    label_names: dict[str, int] = field(default_factory=dict)

    @property
    def slices(self) -> list[int]:
        return sorted({k for plan in self.plans for k in plan.seeds})


def check_label_names(labels: Any, source: str = "labels") -> dict[str, int]:
    """A label configuration ``{name: value}`` with values 1..N (each once), as 3D Slicer maps them to segments."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f'{source} must be a JSON object {{name: value}} such as {{"tumour": 1}}, got {labels!r}')
    out = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{source}: label names must be non-empty strings, got {name!r}")
        if not is_whole_number(value):
            raise ValueError(f"{source}: the value of {name!r} must be an integer, got {value!r}")
        out[name.strip()] = int(value)
    if sorted(out.values()) != list(range(1, len(out) + 1)):
        raise ValueError(
            f"{source}: values {sorted(out.values())} must be 1..{len(out)}, each once: 3D Slicer shows value n as the "
            "n-th label name in value order (0 is the background)"
        )
    return dict(sorted(out.items(), key=lambda item: item[1]))


def _label_of(value: Any, labels: dict[str, int], where: str) -> tuple[str, int]:
    """A request's ``label`` (a configured name or value) -> (name, value)."""
    if isinstance(value, str) and value.strip() in labels:
        return value.strip(), labels[value.strip()]
    if is_whole_number(value) and int(value) in labels.values():
        return next(n for n, v in labels.items() if v == int(value)), int(value)
    if isinstance(value, str) and value.strip().isdigit() and int(value) in labels.values():
        return _label_of(int(value), labels, where)
    raise RequestError(f"{where}label {value!r} is not one of the server's labels {labels} (--conf labels)")


def _int_or_round(name: str, value: Any) -> int:
    """Voxel coordinates: integers, or finite reals (viewers may send fractional voxel positions), rounded."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(f"{name} must hold numbers (voxel indices), got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise RequestError(f"{name} must hold finite numbers, got {value!r}")
    return int(round(float(value)))


def _clicks(name: str, value: Any) -> list[list[int]]:
    if value is None or value == []:
        return []
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{name} must be a list of clicks [[x, y, z], ...], got {value!r}")
    if value and not isinstance(value[0], (list, tuple)):
        value = [value]  # one click given flat
    clicks = []
    for n, point in enumerate(value):
        if not isinstance(point, (list, tuple)) or len(point) != 3:
            raise RequestError(f"{name}[{n}] must be a click [x, y, z] (3 voxel indices), got {point!r}")
        clicks.append([_int_or_round(f"{name}[{n}]", v) for v in point])
    return clicks


def _boxes(value: Any) -> list[list[Any]]:
    if value is None or value == []:
        return []
    if not isinstance(value, (list, tuple)):
        raise RequestError(
            f"roi must be [x0, x1, y0, y1, z0, z1] (3D Slicer's format) or a list of those, got {value!r}"
        )
    return (
        [list(v) if isinstance(v, (list, tuple)) else v for v in value]
        if isinstance(value[0], (list, tuple))
        else [list(value)]
    )


def _check_inside(label: str, point: list[int], shape: tuple[int, ...]) -> None:
    for d, (v, size) in enumerate(zip(point, shape)):
        if not 0 <= v < size:
            raise RequestError(
                f"{label} {point} lies outside the image: {'xyz'[d]}={v} not in [0, {size - 1}] (image size {list(shape)})"
            )


def parse_request(
    request: dict,
    shape: tuple[int, int, int],
    default_mode: str = "2d",
    labels: dict[str, int] | None = None,
    mask: np.ndarray | None = None,
    limits: RequestLimits | None = None,
) -> InteractiveRequest:
    """Validate the prompt fields of a MONAI Label infer ``request`` against a volume of voxel size ``shape``.

    ``labels`` is the server's label configuration (default ``{"lesion": 1}``), ``mask`` an uploaded label map
    ``[x, y, z]`` (already checked to be one of the image's size). Raises :class:`RequestError` for anything
    malformed, out of the volume, contradictory (400) or beyond ``limits`` (413).
    """
    limits = limits or RequestLimits()
    _check_box_count(request, limits)  # before parsing: assigning clicks to boxes grows with both counts
    parsed = _parse_request(request, shape, default_mode, labels, mask)
    _check_clicks_per_slice(parsed, limits)
    return parsed


def _check_box_count(request: dict, limits: RequestLimits) -> None:
    """Every box is an object; an object of ``objects`` without a box is one too."""
    objects = request.get("objects")
    count = len(_boxes(request.get("roi")))
    for obj in objects if isinstance(objects, list) else []:
        count += max(1, len(_boxes(obj.get("roi")))) if isinstance(obj, dict) else 1
    if count > limits.max_boxes:
        raise RequestError(
            f"{count} boxes / objects in one request; at most {limits.max_boxes} per request are served (the app's "
            "--conf max_boxes): send them in several requests",
            status=413,
        )


def _check_clicks_per_slice(parsed: InteractiveRequest, limits: RequestLimits) -> None:
    per_slice: dict[int, int] = {}
    for plan in parsed.plans:
        for k, seed in plan.seeds.items():
            per_slice[k] = per_slice.get(k, 0) + len(seed.points)
    k, count = max(per_slice.items(), key=lambda kv: kv[1], default=(None, 0))
    if count > limits.max_clicks_per_slice:
        raise RequestError(
            f"{count} clicks on slice z={k}; at most {limits.max_clicks_per_slice} per slice are served (the app's "
            "--conf max_clicks_per_slice)",
            status=413,
        )


def _parse_request(request: dict, shape, default_mode: str, labels, mask) -> InteractiveRequest:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise RequestError(f"expected a 3D volume, got size {list(shape)}", status=422)
    mode = request.get("mode", default_mode)
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise RequestError(f"mode must be one of {list(MODES)}, got {mode!r}")
    mode = mode.lower()
    labels = check_label_names(labels or DEFAULT_LABELS)
    slice_index = _slice_index(request.get("slice"), shape)
    top = {k: request.get(k) for k in PROMPT_FIELDS if request.get(k) not in (None, [])}
    objects = request.get("objects")
    if objects is not None:
        if top or mask is not None:
            raise RequestError(
                "give the prompts either in objects or at the top level (or as a label upload), not both"
            )
        if not isinstance(objects, list) or not objects or not all(isinstance(o, dict) for o in objects):
            raise RequestError(
                f"objects must be a non-empty list of {{roi, foreground, background, label}}, got {objects!r}"
            )
        parsed = [_parse_object(o, n, shape, mode, slice_index, labels) for n, o in enumerate(objects)]
        return InteractiveRequest(
            plans=[plan for part, _ in parsed for plan in part.plans],
            mode=mode,
            slice_index=parsed[0][0].slice_index if mode == "2d" else None,
            clicks=[c for part, _ in parsed for c in part.clicks],
            boxes=[b for part, _ in parsed for b in part.boxes],
            labels=[value for part, value in parsed for _ in part.plans],
            label_map=True,
            label_names=labels,
        )
    if mask is not None:
        return _mask_request(mask, top, shape, mode, slice_index, labels)
    name = _answer_name(request.get("label"), labels)
    part = _parse_prompts(request, shape, mode, slice_index)
    part.labels, part.label_names = [1] * len(part.plans), {name: 1}
    return part


def _answer_name(value: Any, labels: dict[str, int]) -> str:
    """The name of a one-label answer: a configured label (by name or value), or any other segment name a client
    sends (3D Slicer sends its selected segment's, which the user may have created), else the first label."""
    if value is None or value == "":
        return next(iter(labels))
    try:
        return _label_of(value, labels, "")[0]
    except RequestError:
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise


def _slice_index(value: Any, shape: tuple[int, ...]) -> int | None:
    if value is None or value == "" or (isinstance(value, numbers.Real) and value < 0):
        return None  # MONAI Label clients send -1 / None for "no slice"
    if not is_whole_number(value):
        raise RequestError(f"slice must be an integer slice index z, got {value!r}")
    value = int(value)
    if not 0 <= value < shape[AXIS]:
        raise RequestError(
            f"slice {value} lies outside the image: not in [0, {shape[AXIS] - 1}] (image size {list(shape)})"
        )
    return value


def _parse_object(obj: dict, n: int, shape, mode, slice_index, labels) -> tuple[InteractiveRequest, int]:
    where = f"objects[{n}]: "
    unknown = set(obj) - set(OBJECT_FIELDS)
    if unknown:
        raise RequestError(f"{where}unknown fields {sorted(unknown)}; an object takes {', '.join(OBJECT_FIELDS)}")
    if obj.get("label") is None:
        raise RequestError(f"{where}no label: name the label of each object (one of {list(labels)})")
    _, value = _label_of(obj["label"], labels, where)
    try:
        return _parse_prompts(obj, shape, mode, slice_index), value
    except RequestError as error:
        raise RequestError(f"{where}{error}", status=error.status) from None


def _mask_request(mask: np.ndarray, top: dict, shape, mode, slice_index, labels) -> InteractiveRequest:
    """An uploaded label map: each label an object on the slices it covers (2d: ``slice`` only, if given), clicks
    joining the object when it is the only one."""
    values = label_values(mask, "label upload")
    unknown = [v for v in values if v not in labels.values()]
    if unknown:
        raise RequestError(f"label upload: values {unknown} are not labels of the server {labels} (--conf labels)")
    if "roi" in top:
        raise RequestError("give a roi or a label upload, not both (the upload gives each slice its box)")
    plans = []
    for value in values:
        plan = mask_plan(mask, AXIS, value, propagate=mode == "3d", source="label upload")
        if mode == "2d" and slice_index is not None:
            if slice_index not in plan.seeds:
                continue
            plan.seeds = {slice_index: plan.seeds[slice_index]}
        plans.append((value, plan))
    if not plans:
        raise RequestError(f"label upload: no label on slice {slice_index}")
    clicks = []
    if top:
        if len(plans) > 1:
            raise RequestError(f"label upload with labels {values}: clicks need a single-label upload to join")
        part = _parse_prompts(top, shape, mode, slice_index)
        clicks = part.clicks
        seeds = plans[0][1].seeds
        for plan in part.plans:
            for k, seed in plan.seeds.items():
                joined = seeds.setdefault(k, SlicePrompt())
                joined.points, joined.labels = joined.points + seed.points, joined.labels + seed.labels
    return InteractiveRequest(
        plans=[plan for _, plan in plans],
        mode=mode,
        slice_index=slice_index if mode == "2d" else None,
        clicks=clicks,
        labels=[value for value, _ in plans],
        label_map=True,
        label_names=labels,
    )


def _parse_prompts(request: dict, shape, mode: str, slice_index: int | None) -> InteractiveRequest:
    """The ``foreground`` / ``background`` / ``roi`` fields of one prompt set (a request or one of its objects)."""
    foreground = _clicks("foreground", request.get("foreground"))
    background = _clicks("background", request.get("background"))
    clicks = [(p, 1) for p in foreground] + [(p, 0) for p in background]
    for p, label in clicks:
        _check_inside("foreground click" if label else "background click", p, shape)
    boxes = []
    raw_boxes = _boxes(request.get("roi"))
    for n, raw in enumerate(raw_boxes):
        name = "roi" if len(raw_boxes) == 1 else f"roi[{n}]"
        if len(raw) not in (4, 6):
            raise RequestError(f"{name} must be [x0, x1, y0, y1, z0, z1] or [x0, x1, y0, y1] (with slice), got {raw!r}")
        values = [_int_or_round(name, v) for v in raw]
        if len(values) == 4:
            z = slice_index if slice_index is not None else next((p[2] for p, _ in reversed(clicks)), None)
            if z is None:
                raise RequestError(f"{name} {raw!r} has no z range: give [x0, x1, y0, y1, z0, z1] or a slice")
            values += [z, z]
        lo = [min(values[2 * d], values[2 * d + 1]) for d in range(3)]
        hi = [max(values[2 * d], values[2 * d + 1]) for d in range(3)]
        _check_inside(f"{name} corner", lo, shape)
        _check_inside(f"{name} corner", hi, shape)
        boxes.append(lo + hi)

    if not clicks and not boxes:
        raise RequestError("no prompt: give foreground clicks [[x, y, z], ...] and/or a roi [x0, x1, y0, y1, z0, z1]")

    # assign clicks to objects: with several boxes, each click joins the box that holds it
    groups: list[tuple[list[int] | None, list[tuple[list[int], int]]]]
    if len(boxes) <= 1:
        groups = [(boxes[0] if boxes else None, clicks)]
    else:
        groups = [(b, []) for b in boxes]
        for p, label in clicks:
            owner = next((g for g in groups if all(g[0][d] <= p[d] <= g[0][d + 3] for d in range(3))), None)
            if owner is None:
                raise RequestError(
                    f"click {p} lies in none of the {len(boxes)} boxes; with several boxes each click must be inside one"
                )
            owner[1].append((p, label))

    if mode == "2d":
        if slice_index is None:
            fg = [p for p, label in clicks if label == 1]
            if fg:
                slice_index = fg[-1][AXIS]
            elif clicks:
                slice_index = clicks[-1][0][AXIS]
            else:
                slice_index = (boxes[0][AXIS] + boxes[0][AXIS + 3]) // 2
        plans = []
        for box, members in groups:
            if box is not None and not box[AXIS] <= slice_index <= box[AXIS + 3]:
                if len(groups) == 1:
                    raise RequestError(
                        f"slice {slice_index} is outside the roi's z range [{box[AXIS]}, {box[AXIS + 3]}]"
                    )
                continue
            on_slice = [(p, label) for p, label in members if p[AXIS] == slice_index]
            if box is None and not on_slice:
                raise RequestError(
                    f"no click on slice {slice_index}: in 2d mode the clicks must be on the segmented slice"
                )
            plans.append(_plan(shape, box, on_slice, slice_only=slice_index))
    else:
        plans = [_plan(shape, box, members) for box, members in groups]
        slice_index = None
    return InteractiveRequest(plans=plans, mode=mode, slice_index=slice_index, clicks=clicks, boxes=boxes)


def _plan(shape, box, clicks, slice_only: int | None = None) -> PromptPlan:
    kwargs: dict[str, Any] = {}
    if clicks:
        kwargs["points"] = [p for p, _ in clicks]
        kwargs["point_labels"] = [label for _, label in clicks]
    if box is not None:
        if slice_only is not None:
            kwargs.update(slice_box=[box[0], box[1], box[3], box[4]], slice_index=slice_only)
        elif box[AXIS] == box[AXIS + 3]:
            kwargs.update(slice_box=[box[0], box[1], box[3], box[4]], slice_index=box[AXIS])  # one slice: propagate
        else:
            kwargs["box"] = box
    try:
        plan = plan_prompts(shape, axis=AXIS, **kwargs)
    except ValueError as error:
        raise RequestError(str(error)) from None
    if slice_only is not None:
        plan.propagate = False
    return plan
