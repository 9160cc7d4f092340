"""MONAI Label request fields -> validated prompt plans for :class:`bundle.inferers.PromptedSliceInferer`.

MONAI Label clients (3D Slicer, OHIF, ``monailabel.client``) send prompts as voxel indices ``[x, y, z]`` of the image
as the server loads it (ITK / nibabel index order, which is also ``LoadImage``'s array order ``[i, j, k]``):

- ``foreground`` / ``background``: lists of clicks ``[x, y, z]`` (a single click may be given flat);
- ``roi``: a box in 3D Slicer's format ``[x0, x1, y0, y1, z0, z1]`` (inclusive voxel bounds, each pair in either
  order, as Slicer's RAS -> IJK conversion may flip them), or ``[x0, x1, y0, y1]`` on one slice, or a list of boxes;
- ``slice``: the slice index ``z`` to segment in 2D mode (default: the slice of the last foreground click, else of
  the last background click, else the middle of the box);
- ``mode``: ``"2d"`` (segment one slice; the interactive default) or ``"3d"`` (a box segments every slice of its z
  range; clicks or a one-slice box propagate slice by slice through the volume).

Every problem raises :class:`RequestError` (a ``ValueError``) whose message names the field and the value.
This module does not import MONAI Label, so it is usable (and testable) without the ``label`` extra.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

from bundle.inferers.volume_prompts import PromptPlan, is_whole_number, plan_prompts

MODES = ("2d", "3d")
AXIS = 2  # slices are taken along z, the third voxel index: what Slicer / OHIF clicks carry
KNOWN_FIELDS = ("foreground", "background", "roi", "slice", "mode")


class RequestError(ValueError):
    """A request that cannot be served; ``status`` is the HTTP status to answer with (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class InteractiveRequest:
    """A parsed request: one prompt plan per object (one per box; clicks join the box that holds them)."""

    plans: list[PromptPlan]
    mode: str
    slice_index: int | None
    clicks: list[tuple[list[int], int]] = field(default_factory=list)
    boxes: list[list[int]] = field(default_factory=list)  # [x0, y0, z0, x1, y1, z1], inclusive, sorted

    @property
    def slices(self) -> list[int]:
        return sorted({k for plan in self.plans for k in plan.seeds})


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


def parse_request(request: dict, shape: tuple[int, int, int], default_mode: str = "2d") -> InteractiveRequest:
    """Validate the prompt fields of a MONAI Label infer ``request`` against a volume of voxel size ``shape``.

    Raises :class:`RequestError` for anything malformed, out of the volume or contradictory.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise RequestError(f"expected a 3D volume, got size {list(shape)}", status=422)
    mode = request.get("mode", default_mode)
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise RequestError(f"mode must be one of {list(MODES)}, got {mode!r}")
    mode = mode.lower()

    foreground = _clicks("foreground", request.get("foreground"))
    background = _clicks("background", request.get("background"))
    clicks = [(p, 1) for p in foreground] + [(p, 0) for p in background]
    for p, label in clicks:
        _check_inside("foreground click" if label else "background click", p, shape)

    slice_index = request.get("slice")
    if (
        slice_index is not None
        and slice_index != ""
        and not (isinstance(slice_index, numbers.Real) and slice_index < 0)
    ):
        if not is_whole_number(slice_index):
            raise RequestError(f"slice must be an integer slice index z, got {slice_index!r}")
        slice_index = int(slice_index)
        if not 0 <= slice_index < shape[AXIS]:
            raise RequestError(
                f"slice {slice_index} lies outside the image: not in [0, {shape[AXIS] - 1}] (image size {list(shape)})"
            )
    else:
        slice_index = None  # MONAI Label clients send -1 / None for "no slice"

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
