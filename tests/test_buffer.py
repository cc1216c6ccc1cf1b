"""ReplayBuffer: FIFO capacity, staleness, sampling without replacement, recency bias, exact accounting;
and (with a local Ray) that only object references reach the learner host, which fetches a whole draw
at once and separates lost objects."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from actors.learner_host import _fetch
from cluster.buffer import AccountingError, ReplayBuffer
from core.prompt_sets import PromptRecord
from core.records import DropReason, SampleRecord, SampleTensors, TrainSample
from tests.ray_cluster import local_ray, wait_until_lost


def record(i: int, version: int = 0, **kw) -> SampleRecord:
    return SampleRecord(sample_id=f"id{i}", prompt=PromptRecord(id=f"p{i}", text=f"prompt {i}"),
                        policy_version=version, **kw)


def entry(i: int, version: int = 0, **kw) -> TrainSample:
    return TrainSample(record(i, version, **kw), f"payload-{i}")


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


def test_epochs_serve_every_sample_e_times_one_epoch_at_a_time_and_count_it_once():
    buf = ReplayBuffer(16, 0, 0.0, 3, require_refs=False, max_uses=3)
    buf.add([entry(i) for i in range(5)])
    draws = [buf.sample(2, 0) for _ in range(8)]  # 15 uses in batches of 2: the last batch holds one
    ids = [[e.sample_id for e in d] for d in draws]
    assert all(len(set(b)) == len(b) for b in ids)  # never twice in one batch
    flat = [i for b in ids for i in b]
    assert Counter(flat) == {f"id{i}": 3 for i in range(5)} and len(flat) == 15
    for epoch in range(3):  # uses never run ahead: sample k is served the (e+1)-th time only after all e-th
        seen = Counter(flat[: 5 * (epoch + 1)])
        assert set(seen.values()) == {epoch + 1}
    s = buf.stats()
    assert (s["trained"], s["served"], s["in_buffer"]) == (5, 15, 0) and buf.check_invariant()
    assert buf.sample(2, 0) == []


def test_a_partly_served_sample_stays_in_the_identity_until_its_last_use():
    buf = ReplayBuffer(16, 100, 0.0, 0, require_refs=False, max_uses=2)
    buf.add([entry(i) for i in range(3)])
    buf.sample(3, 0)  # first epoch: nothing has left yet
    s = buf.stats()
    assert (s["trained"], s["in_buffer"], s["served"]) == (0, 3, 3) and buf.check_invariant()
    buf.sample(1, 0)
    assert buf.stats()["trained"] == 1 and buf.size() == 2
    assert buf.release() == 2 and buf.check_invariant()
    with pytest.raises(ValueError, match="max_uses"):
        ReplayBuffer(4, 0, max_uses=0, require_refs=False)


def test_dropped_duplicate_and_recorded_drops_are_counted_by_reason():
    buf = plain()
    entered = buf.add([
        entry(0),
        entry(1, drop_reason=DropReason.GLOBAL_SCORE_ZERO),
        entry(2, drop_reason=DropReason.JUDGE_FAILED),
        entry(0),  # same sample id again
    ])
    assert entered == 1
    buf.record_drop(DropReason.SCORER_FAILED, 3)
    s = buf.stats()
    assert s["dropped"] == {"duplicate": 1, "global_score_zero": 1, "judge_failed": 1, "scorer_failed": 3}
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
                reason = DropReason.GLOBAL_SCORE_ZERO if rng.random() < 0.1 else None
                batch.append(entry(sid, version=v, drop_reason=reason))
            buf.add(batch)
        elif op < 0.55:
            buf.record_drop(rng.choice([DropReason.JUDGE_FAILED, DropReason.SCORER_FAILED]), rng.randint(0, 3))
        elif op < 0.9:
            learner_version += rng.random() < 0.5
            got = buf.sample(rng.randint(1, 5), learner_version)
            assert len({e.sample_id for e in got}) == len(got)
            drawn_total += len(got)
            if got and rng.random() < 0.2:
                assert buf.mark_lost([got[0].sample_id]) == 1
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


def test_entries_at_the_staleness_bound_are_trained_before_they_go_stale():
    buf = ReplayBuffer(16, 2, 0.0, 0, require_refs=False)
    buf.add([entry(i, version=v) for i, v in enumerate([5, 3, 5, 4, 5, 3])])  # at learner version 5: lags 0 2 0 1 0 2
    first = buf.sample(3, 5)
    assert [e.sample_id for e in first[:2]] == ["id1", "id5"]  # lag 2 == max_staleness: their last chance
    assert buf.sample(10, 6) and buf.stats()["dropped"].get("stale", 0) == 0  # none left to go stale


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
    with pytest.raises(TypeError, match="TrainSample"):
        plain().add([record(0)])
    with pytest.raises(ValueError, match="DropReason"):
        plain().record_drop("judge_fail", 1)  # a misspelt reason is an error, not a new counter
    assert plain().mark_lost(["never-seen"]) == 0  # an id it does not know is not counted twice or invented


# ---------------------------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def ray_local():
    with local_ray("srum-test-buffer", __name__) as ray:
        yield ray


class Inspector:
    """An actor that reports what it received, as the learner host receives its draw."""

    def kinds(self, batches: list[list[TrainSample]]) -> list[str]:
        return [type(s.tensors).__name__ for b in batches for s in b]

    def fetch(self, batches: list[list[TrainSample]]) -> tuple[dict[str, float], int]:
        resolved, lost = _fetch([s for b in batches for s in b])
        return {sid: float(s.tensors.x0[0, 0, 0]) for sid, s in resolved.items()}, len(lost)


def test_a_draw_reaches_the_learner_as_refs_and_is_fetched_whole(ray_local):
    ray = ray_local
    buf = ReplayBuffer(8, 2, 0.0, 0)  # require_refs: the driver holds only references
    tensors = [SampleTensors(x0=torch.full((4, 8, 8), float(i)), R=torch.rand(8, 8)) for i in range(3)]
    assert buf.add([TrainSample(record(i, version=1), ray.put(t)) for i, t in enumerate(tensors)]) == 3
    drawn = buf.sample(3, 1)
    inspector = ray.remote(Inspector).options(num_cpus=0).remote()
    # refs nested in a list argument reach the actor unresolved, so nothing is copied through the call
    assert ray.get(inspector.kinds.remote([drawn])) == ["ObjectRef"] * 3
    values, lost = ray.get(inspector.fetch.remote([drawn[:2], drawn[2:]]))
    assert lost == 0 and values == {f"id{i}": float(i) for i in range(3)}
    # tensors by value in place of a ref are refused, not silently held by the driver
    with pytest.raises(TypeError, match="not a ray.ObjectRef"):
        buf.add([TrainSample(record(9), tensors[0])])
    assert buf.check_invariant()


@pytest.fixture
def owner_actor(ray_local):
    @ray_local.remote(num_cpus=0)
    class Owner:
        def make(self, n: int) -> list:  # objects owned by this actor
            return [ray_local.put(SampleTensors(x0=torch.full((1, 2, 2), float(i)), R=torch.zeros(2, 2)))
                    for i in range(n)]

    return Owner.remote()


def test_lost_objects_are_separated_and_accounted(ray_local, owner_actor):
    ray = ray_local
    *refs, probe = ray.get(owner_actor.make.remote(3))
    buf = ReplayBuffer(8, 2, 0.0, 0)
    assert buf.add([TrainSample(record(i), r) for i, r in enumerate(refs)]) == 2
    ray.kill(owner_actor)  # the objects die with their owner; the buffer still holds the refs
    wait_until_lost(ray, probe)
    live = ray.put(SampleTensors(x0=torch.full((1, 2, 2), 5.0), R=torch.zeros(2, 2)))
    assert buf.add([TrainSample(record(5), live)]) == 1
    drawn = buf.sample(3, 0)
    resolved, lost = _fetch(drawn)
    assert list(resolved) == ["id5"] and float(resolved["id5"].tensors.x0[0, 0, 0]) == 5.0
    assert sorted(lost) == ["id0", "id1"]
    assert buf.mark_lost(lost) == 2
    s = buf.stats()
    assert (s["trained"], s["dropped"], s["generated"]) == (1, {"lost": 2}, 3)
