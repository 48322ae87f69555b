import numpy as np
import pytest

from tasks.trainer import BatchSampler, lr_factor, pick_device


def test_lr_warms_up_then_decays_to_floor():
    factors = [lr_factor(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert factors[0] < factors[5] < factors[9] <= 1.0
    assert max(factors) == pytest.approx(1.0, abs=0.01)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_sampler_is_deterministic_and_covers_an_epoch_without_repeats():
    a, b = BatchSampler(100, 10, seed=7), BatchSampler(100, 10, seed=7)
    epoch = np.concatenate([a.next() for _ in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))
    assert np.array_equal(epoch, np.concatenate([b.next() for _ in range(10)]))
    assert a.state_dict() == {"epoch": 0, "offset": 100}
    nxt = a.next()
    assert a.state_dict() == {"epoch": 1, "offset": 10}
    assert not np.array_equal(nxt, epoch[:10])  # reshuffled for the new epoch


def test_sampler_resumes_from_its_state():
    a = BatchSampler(50, 8, seed=1)
    for _ in range(9):
        a.next()
    b = BatchSampler(50, 8, seed=1)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.next(), b.next())


def test_ranks_read_disjoint_parts_of_the_global_batch():
    ranks = [BatchSampler(64, 4, seed=3, rank=r, world=2) for r in range(2)]
    r0, r1 = ranks[0].next(), ranks[1].next()
    assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)


def test_explicit_device_wins_over_auto():
    assert pick_device("cpu").type == "cpu"
