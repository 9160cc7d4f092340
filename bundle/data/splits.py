"""Case-level train / validation / test splits, seeded: every slice of a case lands in one split."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

__all__ = ["SPLITS", "split_cases", "split_datalist"]

SPLITS = ("train", "validation", "test")


def split_cases(
    cases: Iterable[Hashable],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] = SPLITS,
) -> dict[str, list]:
    """Assign unique case ids to splits: shuffled with ``seed``, sized by ``fractions`` (largest remainder).

    The result does not depend on the input order; each case appears in exactly one split.
    """
    if len(fractions) != len(names) or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions {tuple(fractions)!r}: expected {len(names)} values >= 0 summing to 1")
    unique = sorted(set(cases), key=str)
    order = np.random.RandomState(seed).permutation(len(unique))
    shares = np.asarray(fractions, dtype=np.float64) * len(unique)
    counts = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - counts), kind="stable")[: len(unique) - counts.sum()]:
        counts[i] += 1
    bounds = np.concatenate([[0], np.cumsum(counts)])
    members = (order[bounds[i] : bounds[i + 1]] for i in range(len(names)))
    return {name: sorted((unique[j] for j in chosen), key=str) for name, chosen in zip(names, members)}


def split_datalist(
    datalist: Sequence[dict],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    case_key: str = "case",
    names: Sequence[str] = SPLITS,
) -> dict[str, list[dict]]:
    """Split datalist items by ``item[case_key]`` with `split_cases`; items keep their order."""
    missing = [i for i, item in enumerate(datalist) if case_key not in item]
    if missing:
        raise ValueError(f"datalist item {missing[0]} has no {case_key!r} field; expected a case id per item")
    splits = split_cases((d[case_key] for d in datalist), fractions, seed, names)
    assignment = {case: name for name, cases in splits.items() for case in cases}
    return {name: [item for item in datalist if assignment[item[case_key]] == name] for name in names}
