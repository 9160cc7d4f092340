"""Training data whose order and augmentation draws depend only on a seed and each sample's place in the run, so a run
resumed from a checkpoint sees the very batches the uninterrupted run saw.

ignite's ``ReproducibleBatchSampler`` needs ignite's ``DeterministicEngine``, which MONAI's ``SupervisedTrainer`` is
not built on, and it leaves the transforms' random states to the workers; here a sampler hands each sample its own
draw seed, so the draws do not depend on the worker count either.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from monai.data.utils import set_rnd
from torch.utils.data import Dataset, Sampler


def _mix(*values: int) -> int:
    """One 31-bit seed from several integers (numpy's ``SeedSequence`` hashing)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0] >> 1)


class ResumableSampler(Sampler):
    """Sampler of ``(index, draw_seed)`` keys for :class:`SeededDraws`, ``size`` a pass.

    Sample ``p`` of the run (counting over passes) is index ``order_q[p % size]`` of pass ``q = p // size`` (a
    permutation seeded by ``(seed, q)`` when ``shuffle``) with draw seed ``(seed, p)``. ignite restarts the data, not
    the place in it, when a run resumes; :meth:`seek` puts the next pass at the sample a run resumed after
    ``iteration`` batches stands at, and the pass then ends where the uninterrupted one would have.
    """

    def __init__(self, size: int, seed: int | None = None, shuffle: bool = True) -> None:
        self.size = int(size)
        self.seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
        self.shuffle = bool(shuffle)
        self.position = 0  # the run's next sample

    def __len__(self) -> int:
        return self.size

    def seek(self, iteration: int, batch_size: int, drop_last: bool = False) -> None:
        """Stand where a run that has taken ``iteration`` batches of ``batch_size`` stands."""
        per_pass = self.size // batch_size if drop_last else -(-self.size // batch_size)
        passes, rest = divmod(int(iteration), max(per_pass, 1))
        self.position = passes * self.size + rest * batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self.position
        index = start // self.size
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(_mix(self.seed, index, 1)))
        else:
            order = torch.arange(self.size)
        for p in range(start, (index + 1) * self.size):
            self.position = p + 1
            yield int(order[p % self.size]), _mix(self.seed, p, 2)


class SeededDraws(Dataset):
    """``dataset`` whose random transforms are reseeded before each sample from a ``(index, draw_seed)`` key (see
    :class:`ResumableSampler`); a plain index (e.g. from ``DistributedSampler``) passes through unchanged."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
            # the transform chain alone: walking a cache dataset's items for random states would cost per sample
            set_rnd(getattr(self.dataset, "transform", self.dataset), seed)
            return self.dataset[index]
        return self.dataset[key]
