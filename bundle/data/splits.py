"""Case-level train / validation / test splits, seeded: every slice of a case lands in one split."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["SPLITS", "split_cases", "split_datalist"]

SPLITS = ("train", "validation", "test")


def split_cases(
    cases: Iterable[Hashable],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] = SPLITS,
) -> dict[str, list]:
    """Assign unique case ids to splits: shuffled with ``seed``, sized by ``fractions`` (largest remainder).

    A split with a fraction above 0 that rounding left empty gets one case from the largest split while that one
    keeps at least one, in the order of ``names``: with two or more cases the validation split is never empty
    (three cases at 0.8 / 0.1 / 0.1 give 1 / 1 / 1, not 3 / 0 / 0). A split that stays empty is logged as a warning.
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
    for i in range(len(names)):
        if fractions[i] > 0 and counts[i] == 0:
            donor = int(np.argmax(counts))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
            else:
                logger.warning(
                    "split %r is empty: %d case(s) cannot fill every split of fractions %s",
                    names[i],
                    len(unique),
                    tuple(fractions),
                )
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
