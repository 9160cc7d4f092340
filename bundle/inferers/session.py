"""Interaction state: what the inferer last produced on each slice of one object, so a correction refines it.

An :class:`InteractionSession` belongs to one image and one object. For every slice the inferer decoded it keeps the
prompt that made the mask (box and clicks, in the order applied), the mask itself and the decoder's low-resolution
logits (what weights trained with mask feedback take back as ``mask_inputs``). When the next request on that slice
has the same box and all of the state's clicks, only its other clicks are applied; any other change starts the slice
again from its box. Without a session the inferer replays a request's clicks in order from the box, which gives the
same masks when the earlier clicks come first (the CLI path).

:class:`SessionStore` keeps the sessions of a server: keyed by image and object, bounded in bytes, each entry
expiring ``ttl_s`` seconds after its last use (cachetools' ``TTLCache`` sized by :meth:`InteractionSession.nbytes`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch
from cachetools import TTLCache

Click = tuple[int, int, int]  # (a, b, label) in-plane voxel indices of the slice and 1 / 0


@dataclass
class SliceState:
    """The mask of one slice and the prompt that made it. ``mask`` is bit-packed (``np.packbits``).

    ``box`` is the request's box; ``decode_box`` the box its clicks were decoded with when that differs (a box the
    inferer chose for a slice prompted by clicks alone, :mod:`bundle.inferers.box_scan`).
    """

    box: tuple[int, int, int, int] | None
    clicks: tuple[Click, ...]
    packed: np.ndarray
    shape: tuple[int, int]
    low_res: torch.Tensor | None  # [1, m, m] float16 logits of the slice's last decode
    score: float | None = None
    decode_box: tuple[int, int, int, int] | None = None

    @classmethod
    def create(
        cls, box, clicks, mask: np.ndarray, low_res: torch.Tensor | None, score=None, decode_box=None
    ) -> SliceState:
        low = None if low_res is None else low_res.detach().to("cpu", torch.float16).clone()
        decode_box = None if decode_box == box else decode_box
        return cls(box, tuple(clicks), np.packbits(mask, axis=None), tuple(mask.shape), low, score, decode_box)

    @property
    def mask(self) -> np.ndarray:
        count = self.shape[0] * self.shape[1]
        return np.unpackbits(self.packed, count=count).reshape(self.shape).astype(bool)

    @property
    def nbytes(self) -> int:
        low = 0 if self.low_res is None else self.low_res.numel() * self.low_res.element_size()
        return int(self.packed.nbytes) + low + 64 * (len(self.clicks) + 1)

    def continues(self, box, clicks: tuple[Click, ...]) -> bool:
        """Whether a request for ``box`` and ``clicks`` extends this state: the same box and all of this state's
        clicks among them (clients such as 3D Slicer send foreground and background clicks as two lists, so a new
        click need not come last)."""
        return self.box == box and set(self.clicks) <= set(clicks)

    def new_clicks(self, clicks: tuple[Click, ...]) -> list[Click]:
        """The clicks of a request that :meth:`continues` this state which it has not applied, in their order."""
        done = set(self.clicks)
        return [c for c in clicks if c not in done]


class InteractionSession:
    """Per-slice :class:`SliceState` of one object on one image (slices keyed by ``(axis, index)``)."""

    def __init__(self, boxes: Hashable = None) -> None:
        self.slices: dict[tuple[int, int], SliceState] = {}
        self.boxes = boxes  # what the caller started the session for (e.g. the request's boxes)

    def get(self, axis: int, index: int) -> SliceState | None:
        return self.slices.get((axis, index))

    def put(self, axis: int, index: int, state: SliceState) -> None:
        self.slices[(axis, index)] = state

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.slices.values()) + 256

    def __len__(self) -> int:
        return len(self.slices)


class SessionStore:
    """Interaction sessions of a server, keyed by ``(image key, object key)``: bounded and expiring.

    Args:
        max_bytes: memory budget of all sessions (:attr:`InteractionSession.nbytes`); the least recently used are
            dropped beyond it, and a session larger than the whole budget is not kept.
        ttl_s: seconds after its last use when a session expires.
        timer: the clock (``time.monotonic``; tests pass their own).
    """

    def __init__(self, max_bytes: int = 256 << 20, ttl_s: float = 1800.0, timer=time.monotonic) -> None:
        if max_bytes < 0 or ttl_s <= 0:
            raise ValueError(f"need max_bytes >= 0 and ttl_s > 0, got {max_bytes}, {ttl_s}")
        self.max_bytes = int(max_bytes)
        self.ttl_s = float(ttl_s)
        self._sessions = TTLCache(maxsize=max(1, self.max_bytes), ttl=self.ttl_s, timer=timer, getsizeof=_size)
        self._lock = threading.Lock()

    def get(self, image: Hashable, obj: Hashable) -> InteractionSession:
        """The session of ``obj`` on ``image`` (a new one when there is none or it expired)."""
        with self._lock:
            session = self._sessions.pop((image, obj), None)
        return session if session is not None else InteractionSession()

    def put(self, image: Hashable, obj: Hashable, session: InteractionSession) -> bool:
        """Store ``session`` after a request (re-sized, its expiry restarted); returns whether it was kept."""
        with self._lock:
            self._sessions.pop((image, obj), None)
            if self.max_bytes == 0:
                return False
            try:
                self._sessions[(image, obj)] = session
            except ValueError:  # larger than the whole budget
                return False
            return True

    def reset(self, image: Hashable | None = None) -> int:
        """Drop the sessions of ``image`` (every session with ``None``); returns how many were dropped."""
        with self._lock:
            doomed = [key for key in self._sessions if image is None or key[0] == image]
            for key in doomed:
                del self._sessions[key]
            return len(doomed)

    @property
    def nbytes(self) -> int:
        with self._lock:
            self._sessions.expire()
            return int(self._sessions.currsize)

    def __len__(self) -> int:
        with self._lock:
            self._sessions.expire()
            return len(self._sessions)


def _size(session: InteractionSession) -> int:
    return session.nbytes
