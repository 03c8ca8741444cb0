import numpy as np
import pytest
from ignite.engine import Engine, Events

from medfusionnet.data.samplers import BalancedMultilabelSampler, balanced_sample_weights, capped_draw, training_sampler
from medfusionnet.engine.handlers import CurriculumHandler


@pytest.fixture
def labels():
    """1000 images: finding 0 in 40%, finding 1 in 10%, finding 2 in 1%, about half without findings."""
    rng = np.random.default_rng(0)
    y = np.zeros((1000, 3), np.float32)
    y[:, 0] = rng.random(1000) < 0.4
    y[:, 1] = rng.random(1000) < 0.1
    y[:10, 2] = 1
    return y


def _frequencies(labels, indices):
    return labels[indices].mean(0)


def test_weights_by_hand():
    y = np.array([[1, 0], [1, 0], [1, 1], [0, 0]], np.float32)
    w = balanced_sample_weights(y, power=1.0, no_finding_factor=0.5)
    # rarest finding: 1/0.75 for images 0-1, 1/0.25 for image 2; no finding: 4/1 * 0.5
    raw = np.array([4 / 3, 4 / 3, 4.0, 2.0])
    np.testing.assert_allclose(w, raw / raw.sum())
    np.testing.assert_allclose(balanced_sample_weights(y, power=0.0), [0.25] * 4)


def test_balanced_sampling_moves_frequencies_toward_balance(labels):
    natural = labels.mean(0)
    sampler = BalancedMultilabelSampler(labels, power=1.0, max_repeats=3, seed=1)
    drawn = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    freq = _frequencies(labels, drawn)
    assert freq[2] > 2 * natural[2] and freq[1] > natural[1]  # rare findings oversampled
    assert (labels[drawn].sum(1) == 0).mean() < (labels.sum(1) == 0).mean()  # normal images undersampled
    sampler.set_power(0.0)
    plain = list(sampler)
    assert abs(_frequencies(labels, plain)[0] - natural[0]) < 0.1


def test_repeat_cap_holds(labels):
    for cap in (1, 2, 3):
        sampler = BalancedMultilabelSampler(labels, power=1.0, max_repeats=cap, seed=0)
        counts = np.bincount(list(sampler), minlength=len(labels))
        assert counts.max() <= cap and counts.sum() == len(labels) == len(sampler)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="cannot draw"):
        capped_draw(np.array([1.0, 0.0, 0.0]), 3, 2, rng)


def test_distributed_shards_are_disjoint_and_equal(labels):
    seen = []
    for rank in range(3):
        sampler = BalancedMultilabelSampler(labels, max_repeats=2, num_replicas=3, rank=rank, seed=5)
        sampler.set_epoch(4)
        seen.append(set(sampler))
        assert len(list(sampler)) == len(sampler) == 1000 // 3
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    with pytest.raises(ValueError, match="rank=3"):
        BalancedMultilabelSampler(labels, num_replicas=3, rank=3)


def test_epochs_differ_and_repeat(labels):
    a = BalancedMultilabelSampler(labels, seed=0)
    first = list(a)
    assert list(a) == first
    a.set_epoch(1)
    assert list(a) != first


def test_curriculum_exponent_schedule(labels):
    sampler = BalancedMultilabelSampler(labels)
    handler = CurriculumHandler(sampler, epochs=4)
    assert [handler.power_at(e) for e in range(1, 7)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert CurriculumHandler(sampler, epochs=0).power_at(9) == 1.0
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    powers = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: powers.append((sampler.power, sampler.epoch)))
    engine.run([0], max_epochs=3)
    assert powers == [(1.0, 1), (0.75, 2), (0.5, 3)]
    assert engine.state.curriculum_power == 0.5


def test_training_sampler_factory():
    records = [{"label": np.array([1, 0])}, {"label": np.array([0, 0])}]
    assert training_sampler(records, "natural") is None
    assert isinstance(training_sampler(records, "balanced"), BalancedMultilabelSampler)
    with pytest.raises(ValueError, match="sampling='oversample'"):
        training_sampler(records, "oversample")
