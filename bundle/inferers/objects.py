"""Several objects in one label map: each object a prompt, a name and a label value.

An inference item (a datalist entry, or the CLI's ids) segments one object from its top-level prompt keys, or several
from ``objects``, a list of prompts each with::

    {"box": [i0, j0, k0, i1, j1, k1]}                        a 3D box
    {"slice_box": [i0, j0, i1, j1], "slice_index": k}        a box on one slice, propagated
    {"points": [[i, j, k], ...], "point_labels": [1, 0, ...]} clicks (with a box or alone)
    {"mask_prompt": "mask.nii.gz", "mask_label": 2}          an existing mask (one label of it; all of it by default)
    ... "name": "tumour", "label": 1                         optional, for every kind

A top-level ``mask_prompt`` (no ``objects``) is one object per label of the mask, each keeping its label value (and
its name from the mask's JSON sidecar, when there is one). Labels not given are the smallest values not taken, in
order; names not given are ``label_<value>``. Objects may share a label (several lesions of one class) when their
names agree.

Every check raises ``ValueError`` naming the item and the value, before any inference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .mask_prompts import MAX_LABEL, label_values, load_mask_prompt, mask_label_names, mask_plan
from .volume_prompts import PROMPT_KEYS, PromptPlan, SlicePrompt, is_whole_number, normalize_axis, plan_prompts

#: the prompt keys of one object (top level of an item, or an entry of its ``objects``)
MASK_KEYS = ("mask_prompt", "mask_label")
OBJECT_KEYS = PROMPT_KEYS + MASK_KEYS + ("name", "label")


@dataclass
class SegmentationObject:
    """One object to segment: its label value in the label map, its name and its prompts."""

    name: str
    label: int
    plan: PromptPlan


def parse_objects(value: Any, source: str = "objects") -> list[dict]:
    """The ``objects`` of an item: a list of prompt dicts, a JSON string of one, or a path to a JSON file."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if os.path.isfile(text):
            with open(text) as f:
                value = json.load(f)
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(
                    f"{source}: {text!r} is neither a JSON list of objects nor an existing JSON file"
                ) from None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(o, dict) for o in value):
        raise ValueError(f"{source}: objects must be a non-empty list of prompt dicts, got {value!r}")
    for n, obj in enumerate(value):
        unknown = set(obj) - set(OBJECT_KEYS)
        if unknown:
            raise ValueError(f"{source}[{n}]: unknown keys {sorted(unknown)}; an object takes {', '.join(OBJECT_KEYS)}")
    return [dict(o) for o in value]


def has_prompt(spec: dict) -> bool:
    return any(spec.get(k) is not None for k in PROMPT_KEYS + ("mask_prompt",))


def _label_value(value: Any, where: str) -> int:
    if not is_whole_number(value) or not 1 <= int(value) <= MAX_LABEL:
        raise ValueError(f"{where}: label must be an integer in [1, {MAX_LABEL}] (0 is background), got {value!r}")
    return int(value)


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: name must be a non-empty string, got {value!r}")
    return value.strip()


def _plan_one(spec: dict, spatial: Sequence[int], axis: int | None, where: str, label_slices=None) -> PromptPlan:
    """The prompt plan of one object spec; ``label_slices`` is its loaded mask prompt in slice layout."""
    prompts = {k: spec.get(k) for k in PROMPT_KEYS}
    if label_slices is None:
        return plan_prompts(spatial, **prompts, axis=axis, source=where)
    if any(prompts[k] is not None for k in ("box", "slice_box")):
        raise ValueError(f"{where}: give either a box or a mask_prompt for an object, not both")
    plan_axis = 2 if len(spatial) == 2 else normalize_axis(axis, 3)
    plan = mask_plan(label_slices, plan_axis, spec.get("mask_label"), propagate=len(spatial) == 3, source=where)
    if prompts["points"] is not None or prompts["point_labels"] is not None:
        clicks = plan_prompts(spatial, points=prompts["points"], point_labels=prompts["point_labels"], axis=axis)
        for k, seed in clicks.seeds.items():
            joined = plan.seeds.setdefault(k, SlicePrompt())
            joined.points += seed.points
            joined.labels += seed.labels
    return plan


def plan_objects(
    specs: Sequence[dict],
    spatial: Sequence[int],
    axis: int | None,
    source: str,
) -> list[SegmentationObject]:
    """Validate object ``specs`` against an image of spatial shape ``spatial`` and plan their prompts.

    A spec holding ``"_each_label": True`` (a top-level mask prompt) stands for one object per label of its mask.
    Returns the objects with their labels and names assigned (see the module docstring).
    """
    from .volume import to_slices

    slice_axis = 2 if len(spatial) == 2 else normalize_axis(axis, 3)

    def slices_of(label_map):  # the inferer's slice layout
        return to_slices(label_map[None], slice_axis)

    entries: list[tuple[dict, PromptPlan, int | None, str | None]] = []  # spec, plan, label, name
    masks: dict[str, np.ndarray] = {}
    for n, spec in enumerate(specs):
        where = f"{source}: object {n + 1}" if len(specs) > 1 else source
        if not has_prompt(spec):
            raise ValueError(
                f"{where}: no prompt; give box, slice_box with slice_index, points with point_labels, or mask_prompt"
            )
        label = _label_value(spec["label"], where) if spec.get("label") is not None else None
        name = _name(spec["name"], where) if spec.get("name") is not None else None
        if spec.get("mask_label") is not None and spec.get("mask_prompt") is None:
            raise ValueError(f"{where}: mask_label {spec['mask_label']!r} was given without a mask_prompt")
        if spec.get("mask_prompt") is None:
            entries.append((spec, _plan_one(spec, spatial, axis, where), label, name))
            continue
        path = os.fspath(spec["mask_prompt"])
        if path not in masks:
            slice_index = spec.get("slice_index") if len(spatial) == 3 else None
            masks[path] = load_mask_prompt(
                path, spatial, slice_index=slice_index, axis=axis if axis is not None else -1
            )
        label_map = masks[path]
        where = f"{where} (mask_prompt {path})"
        values = label_values(label_map, path)
        if spec.get("_each_label"):
            names = mask_label_names(path)
            for value in values:
                single = {**spec, "mask_label": value, "slice_index": None}
                plan = _plan_one(single, spatial, axis, where, slices_of(label_map))
                entries.append((single, plan, value, names.get(value)))
            continue
        chosen = spec.get("mask_label")
        if chosen is not None:
            chosen = _label_value(chosen, where)
            if chosen not in values:
                raise ValueError(f"{where}: mask_label {chosen} is not in the mask (its labels: {values})")
        spec = {**spec, "mask_label": chosen, "slice_index": None}
        entries.append((spec, _plan_one(spec, spatial, axis, where, slices_of(label_map)), label, name))
    return _assign(entries, source)


def _assign(entries, source: str) -> list[SegmentationObject]:
    """Labels and names: given ones kept, the rest the smallest free labels; a label has one name and vice versa."""
    taken = {label for _, _, label, _ in entries if label is not None}
    free = (v for v in range(1, MAX_LABEL + 1) if v not in taken)
    names_of: dict[int, str] = {}
    for _, _, label, name in entries:
        if label is not None and name is not None:
            if names_of.setdefault(label, name) != name:
                raise ValueError(f"{source}: label {label} is named both {names_of[label]!r} and {name!r}")
    objects = []
    for _, plan, label, name in entries:
        if label is None:
            label = next((v for v, known in names_of.items() if name is not None and known == name), None)
            label = label if label is not None else next(free)
        name = name or names_of.get(label) or f"label_{label}"
        names_of.setdefault(label, name)
        objects.append(SegmentationObject(name=name, label=label, plan=plan))
    labels_of: dict[str, int] = {}
    for obj in objects:
        if labels_of.setdefault(obj.name, obj.label) != obj.label:
            raise ValueError(f"{source}: name {obj.name!r} is given to labels {labels_of[obj.name]} and {obj.label}")
    return objects


def item_specs(item: dict) -> list[dict]:
    """The object specs of one inference item: its ``objects``, or its top-level prompt as one object (a top-level
    ``mask_prompt`` as one object per label of the mask)."""
    top = {k: item.get(k) for k in OBJECT_KEYS if item.get(k) is not None and k != "label"}
    where = str(item.get("image"))
    if item.get("objects") is not None:
        if any(k in top for k in PROMPT_KEYS + MASK_KEYS):
            raise ValueError(f"{where}: give prompts either at the top level (one object) or in objects, not both")
        if "name" in top:
            raise ValueError(f"{where}: name belongs to each of the objects")
        return parse_objects(item["objects"], f"{where}: objects")
    if top.get("mask_prompt") is not None and top.get("mask_label") is None:
        top["_each_label"] = True
    return [top]


def label_names(objects: Sequence[SegmentationObject]) -> dict[str, int]:
    """``{name: label}`` in label order (MONAI Label's ``label_names``)."""
    return {o.name: o.label for o in sorted(objects, key=lambda o: o.label)}


def label_dtype(objects: Sequence[SegmentationObject]) -> np.dtype:
    """uint8 when every label fits, else uint16."""
    return np.dtype(np.uint8 if max(o.label for o in objects) <= 255 else np.uint16)
