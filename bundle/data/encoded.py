"""The training set of a prompt-free task model: random windows of every image, encoded once or augmented anew.

With a decoder-side task model (:class:`bundle.networks.FeatureDecoder`) each image's augmentation runs ``views``
times when the set is built, every window goes through the frozen encoder once, and training cycles through the cached
encoder outputs: an epoch costs decoder passes only. Without one (a conv branch is trained, so the encoder's outputs
change), the set holds the images and the augmentation runs again at every epoch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import torch
from monai.data import Dataset
from monai.transforms import Compose, Randomizable, Transform

from .datasets import cached_dataset

__all__ = ["EncodedViews", "task_dataset"]

logger = logging.getLogger(__name__)


def _split_at_first_random(transform: Compose) -> tuple[Compose, Compose]:
    """The deterministic transforms before the first random one, and the rest (as MONAI's CacheDataset splits)."""
    steps = list(transform.flatten().transforms)
    first = next(
        (i for i, t in enumerate(steps) if isinstance(t, Randomizable) or not isinstance(t, Transform)), len(steps)
    )
    return Compose(steps[:first]), Compose(steps[first:])


class EncodedViews(Dataset):
    """``views`` random windows of every item, each encoded once: items ``{"image": embedding, <extra keys>, "label"}``.

    Args:
        data: datalist of ``{"image", "label", ...}``.
        transform: the training pipeline, its random part last, ending in a network input window ``[3, S, S]`` and
            its mask ``[1, S, S]``; the deterministic part runs once per item, the random part once per view.
        encoder: a :class:`bundle.networks.FeatureDecoder` (its ``encode`` gives the entries).
        views: windows per item.
        batch_size: windows per encoder call.
        dtype: storage dtype of the encoder outputs (``torch.float16`` halves the memory).
        seed: seed of the random part (the same views on every run).

    Memory: ``len(data) x views`` windows of the encoder's outputs (LiteMedSAM: 4 MiB per window in float32).
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Compose,
        encoder,
        views: int = 8,
        batch_size: int = 4,
        dtype: torch.dtype = torch.float32,
        seed: int | None = 0,
    ) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        deterministic, random_part = _split_at_first_random(transform)
        if seed is not None:
            random_part.set_random_state(seed=seed)
        device = next(encoder.parameters()).device
        start = time.perf_counter()
        windows: list[dict] = []
        for item in data:
            prepared = deterministic(dict(item))
            for _ in range(views):
                out = random_part(dict(prepared))
                windows.extend(out if isinstance(out, list) else [out])
        entries: list[dict] = []
        for first in range(0, len(windows), batch_size):
            chunk = windows[first : first + batch_size]
            images = torch.stack([torch.as_tensor(w["image"]).float() for w in chunk]).to(device)
            encoded = encoder.encode(images)
            for n, window in enumerate(chunk):
                entry = {key: value[n].to("cpu", dtype) for key, value in encoded.items()}
                entry["label"] = torch.as_tensor(window["label"]).float()
                entries.append(entry)
        megabytes = sum(v.numel() * v.element_size() for e in entries for k, v in e.items() if k != "label") / 2**20
        logger.info(
            "encoded %d windows (%d views of %d images) in %.1f s, %.0f MiB of encoder outputs cached",
            len(entries),
            views,
            len(data),
            time.perf_counter() - start,
            megabytes,
        )
        super().__init__(data=entries, transform=None)

    def _transform(self, index: int):
        entry = self.data[index]
        return {key: value.float() for key, value in entry.items()}


def task_dataset(
    data: Sequence[dict],
    transform: Compose,
    feature_encoder=None,
    views: int = 8,
    feature_dtype: torch.dtype | str = torch.float32,
    seed: int | None = 0,
    cache: str = "memory",
    cache_dir: str | os.PathLike | None = None,
    cache_rate: float = 1.0,
    num_workers: int | None = 0,
):
    """The training set of a prompt-free task model: :class:`EncodedViews` with a ``feature_encoder``
    (:class:`bundle.networks.FeatureDecoder`), else :func:`bundle.data.cached_dataset` of the images (``cache``,
    ``cache_dir``, ``cache_rate``, ``num_workers`` as there)."""
    if feature_encoder is not None:
        dtype = getattr(torch, feature_dtype) if isinstance(feature_dtype, str) else feature_dtype
        return EncodedViews(data, transform, feature_encoder, views=views, dtype=dtype, seed=seed)
    return cached_dataset(data, transform, cache, cache_dir, cache_rate, num_workers)
