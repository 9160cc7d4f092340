"""Datalist checks: every file a datalist names exists, before any training or evaluation starts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["check_files"]


def check_files(
    datalist,
    keys: Sequence[str] = ("image", "label"),
    base_dir: str | os.PathLike | None = None,
    what: str = "datalist",
):
    """Return ``datalist`` unchanged after checking that every path under ``keys`` exists.

    Items are dicts; a key may hold one path or a list of paths (several masks per image). Relative paths are taken
    against ``base_dir``. Raises FileNotFoundError naming the first missing file(s) and their item, so a bad datalist
    fails when the config is parsed, before any training iteration.
    """
    missing = []
    for index, item in enumerate(datalist):
        if not isinstance(item, dict):
            continue
        for key in keys:
            values = item.get(key)
            for value in [values] if isinstance(values, (str, os.PathLike)) else list(values or []):
                if not isinstance(value, (str, os.PathLike)):
                    continue
                path = Path(value) if base_dir is None or os.path.isabs(value) else Path(base_dir) / value
                if not path.exists():
                    missing.append(f"{path} (item {index}, key {key!r})")
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{what}: {len(missing)} listed file(s) missing: " + "; ".join(missing[:5]) + more)
    return datalist
