"""Resumable training data: the sampler's stream after a seek is the uninterrupted stream's rest, each sample's
augmentation draws follow its draw seed, and the trainer's state carries the seeds."""

from __future__ import annotations

import numpy as np
import pytest
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandGaussianNoised

from bundle.data import ResumableSampler, SeededDraws


def _stream(sampler: ResumableSampler, passes: int) -> list[tuple[int, int]]:
    return [key for _ in range(passes) for key in sampler]


@pytest.mark.parametrize("batch_size, drop_last", [(2, False), (3, False), (3, True)])
def test_seek_continues_the_uninterrupted_stream(batch_size, drop_last):
    full = _stream(ResumableSampler(7, seed=3), 3)
    assert sorted(i for i, _ in full[:7]) == list(range(7)) and full[:7] != full[7:14]  # a new order each pass
    per_pass = 7 // batch_size if drop_last else -(-7 // batch_size)
    for iteration in range(3 * per_pass):
        resumed = ResumableSampler(7, seed=3)
        resumed.seek(iteration, batch_size, drop_last)
        passes, rest = divmod(iteration, per_pass)
        start = passes * 7 + rest * batch_size
        assert _stream(resumed, 3 - passes)[: len(full) - start] == full[start:]


def test_seed_changes_order_and_draws():
    assert _stream(ResumableSampler(7, seed=3), 1) != _stream(ResumableSampler(7, seed=4), 1)
    assert [i for i, _ in ResumableSampler(5, seed=3, shuffle=False)] == list(range(5))


def test_seeded_draws_follow_the_key_not_the_call_order():
    data = [{"x": np.zeros((1, 4, 4), np.float32)} for _ in range(3)]
    dataset = SeededDraws(Dataset(data, Compose([RandGaussianNoised("x", prob=1.0)])))
    first, second = dataset[(0, 11)]["x"], dataset[(1, 12)]["x"]
    np.testing.assert_array_equal(dataset[(1, 12)]["x"], second)  # again, after another draw
    np.testing.assert_array_equal(dataset[(0, 11)]["x"], first)
    assert not np.array_equal(first, second)
    assert dataset[2]["x"].shape == (1, 4, 4)  # a plain index (DistributedSampler) passes through
    batches = [b["x"] for b in DataLoader(dataset, batch_size=2, sampler=ResumableSampler(3, seed=0))]
    again = [b["x"] for b in DataLoader(dataset, batch_size=2, sampler=ResumableSampler(3, seed=0), num_workers=1)]
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a, b)  # the worker count does not change the draws
