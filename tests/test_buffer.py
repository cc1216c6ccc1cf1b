"""ReplayBuffer: FIFO capacity, staleness, sampling without replacement, recency bias, exact accounting,
and (with a local Ray) that only object references travel through the buffer actor."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from cluster.buffer import AccountingError, ReplayBuffer, resolve_entries
from cluster.records import BufferEntry, SampleMeta, TrainSample, make_entry
from tests.ray_cluster import local_ray, wait_until_lost


def meta(i: int, version: int = 0, **kw) -> SampleMeta:
    return SampleMeta(sample_id=f"id{i}", prompt_id=f"p{i}", prompt=f"prompt {i}", policy_version=version, **kw)


def entry(i: int, version: int = 0, **kw) -> BufferEntry:
    return BufferEntry(meta=meta(i, version, **kw), ref=f"payload-{i}")


def plain(capacity: int = 8, max_staleness: int = 100, recency_bias: float = 0.0, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer(capacity, max_staleness, recency_bias, seed, require_refs=False)


# ---------------------------------------------------------------------------------------------- plain class
def test_fifo_eviction_keeps_newest_and_counts_evicted():
    buf = plain(capacity=3)
    assert buf.add([entry(i) for i in range(5)]) == 5
    assert buf.size() == 3
    assert [m.sample_id for m in buf.peek(10)] == ["id4", "id3", "id2"]  # newest first
    s = buf.stats()
    assert (s["generated"], s["in_buffer"], s["trained"], s["dropped"]) == (5, 3, 0, {"evicted": 2})
    assert buf.check_invariant()


def test_flagged_duplicate_and_recorded_drops_are_counted_by_reason():
    buf = plain()
    entered = buf.add([
        entry(0),
        entry(1, drop=True, drop_reason="zero_global"),
        entry(2, drop=True),  # no reason given
        entry(0),  # same sample id again
    ])
    assert entered == 1
    buf.record_drop("judge_failed", 3)
    s = buf.stats()
    assert s["dropped"] == {"duplicate": 1, "flagged": 1, "judge_failed": 3, "zero_global": 1}
    assert (s["generated"], s["in_buffer"]) == (7, 1)
    assert buf.check_invariant()


def test_staleness_evicts_on_sample_and_rejects_on_add():
    buf = plain(capacity=10, max_staleness=2)
    buf.add([entry(v, version=v) for v in range(6)])  # versions 0..5
    assert buf.sample(0, learner_version=5) == []  # 5 - v > 2 for v in {0, 1, 2}
    s = buf.stats()
    assert s["dropped"] == {"stale": 3}
    assert (s["oldest_version"], s["newest_version"], s["learner_version"]) == (3, 5, 5)
    # The learner is at 5 now: a version-2 sample arriving late never enters.
    assert buf.add([entry(99, version=2)]) == 0
    assert buf.stats()["dropped"] == {"stale": 4}
    assert buf.check_invariant()


def test_sampling_is_without_replacement_and_counts_trained():
    buf = plain(capacity=10)
    buf.add([entry(i) for i in range(10)])
    drawn = [buf.sample(4, learner_version=0) for _ in range(3)]
    assert [len(d) for d in drawn] == [4, 4, 2]
    ids = [e.sample_id for d in drawn for e in d]
    assert sorted(ids) == sorted(f"id{i}" for i in range(10))
    s = buf.stats()
    assert (s["trained"], s["in_buffer"], s["sample_calls"]) == (10, 0, 3)
    assert buf.sample(4, learner_version=0) == []


def test_min_n_draws_nothing_when_short():
    buf = plain()
    buf.add([entry(i) for i in range(3)])
    assert buf.sample(4, learner_version=0, min_n=4) == []
    assert (buf.size(), buf.stats()["trained"]) == (3, 0)
    assert len(buf.sample(4, learner_version=0, min_n=3)) == 3


def test_sampling_is_deterministic_for_a_seed():
    def draws(seed: int) -> list[list[str]]:
        buf = plain(capacity=50, recency_bias=2.0, seed=seed)
        out = []
        for k in range(5):
            buf.add([entry(10 * k + i) for i in range(10)])
            out.append([e.sample_id for e in buf.sample(3, learner_version=0)])
        return out

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("bias", [0.0, 3.0])
def test_recency_bias_matches_expected_first_draw_probabilities(bias):
    # One draw from 10 entries; P(rank r) = exp(bias * r / 10) / sum_j exp(bias * j / 10).
    # bias 3: sum = (e^3 - 1) / (e^0.3 - 1) = 54.55, so P(newest) = e^2.7 / 54.55 = 0.2728, P(oldest) = 0.0183.
    buf = plain(capacity=10, recency_bias=bias, seed=123)
    trials, counts = 4000, Counter()
    for t in range(trials):
        buf.add([entry(10 * t + r) for r in range(10)])
        (drawn,) = buf.sample(1, learner_version=0)
        counts[int(drawn.sample_id[2:]) % 10] += 1
        buf.release()
    freq = np.array([counts[r] / trials for r in range(10)])
    if bias == 0.0:
        assert np.all(np.abs(freq - 0.1) < 0.02), freq
    else:
        assert abs(freq[9] - 0.2728) < 0.03, freq
        assert abs(freq[0] - 0.0183) < 0.012, freq
        assert freq[5:].sum() > 3 * freq[:5].sum()  # newer drawn far more often
    buf.check_invariant()


def test_invariant_holds_after_a_random_sequence_of_operations():
    rng = random.Random(0)
    buf = plain(capacity=16, max_staleness=3, recency_bias=1.0, seed=1)
    learner_version, next_id, drawn_total, lost_total = 0, 0, 0, 0
    for _ in range(600):
        op = rng.random()
        if op < 0.45:
            batch = []
            for _ in range(rng.randint(1, 6)):
                sid = next_id if rng.random() > 0.05 else max(0, next_id - 1)  # some duplicates
                next_id += 1
                v = max(0, learner_version - rng.randint(0, 5))
                batch.append(entry(sid, version=v, drop=rng.random() < 0.1, drop_reason=rng.choice([None, "zero_global"])))
            buf.add(batch)
        elif op < 0.55:
            buf.record_drop(rng.choice(["judge_failed", "scorer_failed"]), rng.randint(0, 3))
        elif op < 0.9:
            learner_version += rng.random() < 0.5
            got = buf.sample(rng.randint(1, 5), learner_version)
            assert len({e.sample_id for e in got}) == len(got)
            drawn_total += len(got)
            if got and rng.random() < 0.2:
                buf.mark_lost(1)
                lost_total += 1
        elif op < 0.93:
            buf.release()
        s = buf.stats()
        assert s["generated"] == s["trained"] + s["in_buffer"] + s["dropped_total"], s
        assert buf.check_invariant()
    s = buf.stats()
    assert s["trained"] == drawn_total - lost_total
    assert s["dropped"].get("lost", 0) == lost_total
    assert {"stale", "evicted", "duplicate"} <= set(s["dropped"])  # the sequence exercised every path


def test_check_invariant_raises_on_broken_accounting():
    buf = plain()
    buf.add([entry(0)])
    buf._generated += 1  # simulate a bug
    with pytest.raises(AccountingError, match="generated=2 != trained=0 \\+ in_buffer=1"):
        buf.check_invariant()


def test_stats_summarise_what_is_held():
    buf = plain()
    buf.add([
        entry(0, version=1, global_score=0.5, alpha=0.75, mean_R=0.5),
        entry(1, version=3, global_score=-0.5, alpha=0.25, mean_R=0.25),
        entry(2, version=2, global_score=None, alpha=1.0, mean_R=0.0),
    ])
    s = buf.stats()
    assert s["mean_global_score"] == pytest.approx(0.0)  # None is left out
    assert s["mean_alpha"] == pytest.approx(2.0 / 3.0)
    assert s["mean_R"] == pytest.approx(0.25)
    assert (s["oldest_version"], s["newest_version"]) == (1, 3)
    assert plain().stats()["mean_global_score"] is None


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, 1)
    with pytest.raises(ValueError, match="recency_bias"):
        ReplayBuffer(4, 1, recency_bias=-1.0)
    strict = ReplayBuffer(4, 1)
    with pytest.raises(TypeError, match="not a ray.ObjectRef"):
        strict.add([entry(0)])
    assert strict.stats()["generated"] == 0  # a rejected call changes nothing
    with pytest.raises(TypeError, match="BufferEntry"):
        plain().add([meta(0)])
    with pytest.raises(ValueError, match="reason"):
        plain().record_drop("", 1)
    with pytest.raises(ValueError, match="exceeds"):
        plain().mark_lost(1)


# ---------------------------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def ray_local():
    with local_ray("srum-test-buffer", __name__) as ray:
        yield ray


def test_remote_buffer_moves_refs_not_tensors(ray_local):
    ray = ray_local
    buf = ray.remote(ReplayBuffer).options(num_cpus=0).remote(8, 2, 0.0, 0)
    samples = [
        TrainSample(x0=torch.full((4, 8, 8), float(i)), R=torch.rand(8, 8), alpha=0.5, prompt=f"p{i}", sample_id=f"id{i}")
        for i in range(3)
    ]
    entries = [make_entry(meta(i, version=1), s) for i, s in enumerate(samples)]
    assert all(isinstance(e.ref, ray.ObjectRef) for e in entries)
    # The actor was built with require_refs=True: it would raise a TypeError had Ray resolved the refs.
    assert ray.get(buf.add.remote(entries)) == 3
    drawn = ray.get(buf.sample.remote(3, 1))
    assert all(isinstance(e.ref, ray.ObjectRef) for e in drawn)
    ok, lost = resolve_entries(drawn, timeout_s=30)
    assert lost == []
    by_id = {e.sample_id: s for e, s in ok}
    for i, s in enumerate(samples):
        assert torch.equal(by_id[f"id{i}"].x0, s.x0) and torch.equal(by_id[f"id{i}"].R, s.R)
    # A tensor in place of a ref is refused by the actor, not silently copied through it.
    with pytest.raises(TypeError, match="not a ray.ObjectRef"):
        ray.get(buf.add.remote([BufferEntry(meta=meta(9), ref=torch.zeros(3))]))
    assert ray.get(buf.check_invariant.remote())


@pytest.fixture
def owner_actor(ray_local):
    @ray_local.remote(num_cpus=0)
    class Owner:
        def make(self, n: int) -> list:
            return [ray_local.put(np.full(4, float(i))) for i in range(n)]  # owned by this actor

    return Owner.remote()


def test_buffer_never_resolves_refs_and_lost_objects_are_accounted(ray_local, owner_actor):
    ray = ray_local
    *refs, probe = ray.get(owner_actor.make.remote(3))
    buf = ray.remote(ReplayBuffer).options(num_cpus=0).remote(8, 2, 0.0, 0)
    assert ray.get(buf.add.remote([BufferEntry(meta(i), r) for i, r in enumerate(refs)])) == 2
    ray.kill(owner_actor)  # the objects die with their owner; the buffer still holds the refs
    wait_until_lost(ray, probe)
    live = ray.put(np.arange(3.0))
    assert ray.get(buf.add.remote([BufferEntry(meta(5), live)])) == 1
    drawn = ray.get(buf.sample.remote(3, 0))
    ok, lost = resolve_entries(drawn, timeout_s=20)
    assert [e.sample_id for e, _ in ok] == ["id5"] and np.array_equal(ok[0][1], np.arange(3.0))
    assert sorted(e.sample_id for e, _ in lost) == ["id0", "id1"]
    assert all("OwnerDied" in why or "ObjectLost" in why for _, why in lost)
    ray.get(buf.mark_lost.remote(len(lost)))
    s = ray.get(buf.stats.remote())
    assert (s["trained"], s["dropped"], s["generated"]) == (1, {"lost": 2}, 3)
