"""Streaming FedAvg aggregation against hand-computed weighted means."""

import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedsim.strategies import FedAvg
from fedsim.strategies.aggregation import InvalidReplyError, WeightedMean
from tests.conftest import reply


def _fedavg_with_model(**shapes: tuple[int, ...]) -> FedAvg:
    strategy = FedAvg(seed=0)
    strategy._shapes = dict(shapes)  # as configure_train would have recorded
    return strategy


def test_weighted_mean_matches_hand_computation() -> None:
    mean = WeightedMean()
    mean.add({"w": np.array([1.0, 2.0], dtype=np.float32)}, 1)
    mean.add({"w": np.array([3.0, 6.0], dtype=np.float32)}, 3)
    # (1*[1,2] + 3*[3,6]) / 4 = [10, 20] / 4
    np.testing.assert_array_equal(mean.mean()["w"], np.array([2.5, 5.0], dtype=np.float32))
    assert mean.mean()["w"].dtype == np.float32
    assert mean.total_weight == 4 and mean.count == 2


@pytest.mark.parametrize(
    ("values", "weight", "message"),
    [
        ({"w": np.zeros(3)}, 1, "shape"),
        ({"v": np.zeros(2)}, 1, "missing"),
        ({"w": np.array([np.nan, 0.0])}, 1, "NaN"),
        ({"w": np.zeros(2)}, -1, ">= 0"),
        ({"w": np.zeros(2)}, float("inf"), ">= 0"),
    ],
)
def test_weighted_mean_rejects_bad_terms_without_changing_the_sum(values, weight, message) -> None:
    mean = WeightedMean({"w": (2,)})
    mean.add({"w": np.array([1.0, 1.0])}, 2)
    with pytest.raises(InvalidReplyError, match=message):
        mean.add(values, weight)
    np.testing.assert_array_equal(mean.mean()["w"], [1.0, 1.0])
    assert mean.count == 1


def test_a_checked_term_adds_as_add_would() -> None:
    checked, direct = WeightedMean(), WeightedMean()
    for values, weight in (({"w": np.array([1.0, 2.0])}, 1), ({"w": np.array([3.0, 6.0])}, 3)):
        checked.add_checked(checked.check(values, weight))
        direct.add(values, weight)
    np.testing.assert_array_equal(checked.mean()["w"], direct.mean()["w"])
    assert (checked.count, checked.total_weight) == (direct.count, direct.total_weight) == (2, 4)


def test_a_term_checked_before_another_fixed_the_shapes_is_rejected() -> None:
    mean = WeightedMean()
    first, other = mean.check({"w": np.zeros(2)}, 1), mean.check({"w": np.zeros(3)}, 1)
    mean.add_checked(first)
    with pytest.raises(InvalidReplyError, match="other shapes"):
        mean.add_checked(other)
    assert mean.count == 1


def test_read_only_replies_convert_without_a_warning() -> None:
    # torch warns once per process; a fresh interpreter shows whether the module spent it.
    code = (
        "import warnings, numpy as np\n"
        "from fedsim.strategies.aggregation import WeightedMean\n"
        "warnings.simplefilter('error', UserWarning)\n"
        "payload = np.frombuffer(np.ones(2, np.float32).tobytes(), dtype=np.float32)\n"
        "mean = WeightedMean()\n"
        "mean.add({'w': payload}, 1)\n"
        "print(mean.mean()['w'].tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1.0, 1.0]"


def test_fedavg_aggregates_arrays_and_metrics_weighted_by_examples() -> None:
    strategy = _fedavg_with_model(w=(2,), b=(1,))
    replies = [
        reply(
            2,
            {"w": np.array([0.0, 4.0], np.float32), "b": np.array([1.0], np.float32)},
            **{"num-examples": 10, "train_loss": 1.0},
        ),
        reply(
            3,
            {"w": np.array([4.0, 0.0], np.float32), "b": np.array([3.0], np.float32)},
            **{"num-examples": 30, "train_loss": 3.0},
        ),
    ]
    arrays, metrics = strategy.aggregate_train(1, iter(replies))
    # w = (10*[0,4] + 30*[4,0]) / 40 = [3, 1];  b = (10*1 + 30*3) / 40 = 2.5;  loss likewise 2.5
    np.testing.assert_array_equal(arrays["w"].numpy(), [3.0, 1.0])
    np.testing.assert_array_equal(arrays["b"].numpy(), [2.5])
    assert metrics == {"train_loss": 2.5}


def test_fedavg_skips_failed_and_malformed_replies() -> None:
    strategy = _fedavg_with_model(w=(2,))
    good = reply(
        2, {"w": np.array([2.0, 2.0], np.float32)}, **{"num-examples": 5, "train_loss": 1.0}
    )
    instruction = Message(RecordDict(), 3, "train")
    failed = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"), reply_to=instruction)
    wrong_shape = reply(4, {"w": np.zeros(3, np.float32)}, **{"num-examples": 5, "train_loss": 1.0})
    nan = reply(
        5, {"w": np.array([np.nan, 0], np.float32)}, **{"num-examples": 5, "train_loss": 1.0}
    )
    no_weight = reply(6, {"w": np.zeros(2, np.float32)}, train_loss=1.0)
    other_metrics = reply(7, {"w": np.zeros(2, np.float32)}, **{"num-examples": 5, "other": 1.0})
    replies = [failed, good, wrong_shape, nan, no_weight, other_metrics]
    arrays, metrics = strategy.aggregate_train(1, iter(replies))
    np.testing.assert_array_equal(arrays["w"].numpy(), [2.0, 2.0])
    assert metrics == {"train_loss": 1.0}


def test_weighted_mean_ignores_zero_weight_terms() -> None:
    mean = WeightedMean()
    mean.add({"w": np.array([1.0])}, 0)  # a client whose partition is empty
    mean.add({"w": np.array([4.0])}, 2)
    assert mean.mean()["w"][0] == 4.0 and mean.count == 1


def test_fedavg_returns_none_when_every_reply_failed() -> None:
    strategy = _fedavg_with_model(w=(2,))
    bad = reply(2, {"w": np.zeros(5, np.float32)}, **{"num-examples": 1, "train_loss": 1.0})
    assert strategy.aggregate_train(1, iter([bad])) == (None, None)


def test_fedavg_evaluate_metrics_are_example_weighted() -> None:
    strategy = FedAvg(seed=0)
    replies = [
        reply(2, None, **{"num-examples": 1, "accuracy": 1.0, "loss": 0.0}),
        reply(3, None, **{"num-examples": 3, "accuracy": 0.0, "loss": 4.0}),
    ]
    assert strategy.aggregate_evaluate(1, iter(replies)) == {"accuracy": 0.25, "loss": 3.0}


def _peak_aggregation_bytes(cohort: int, size: int) -> int:
    strategy = _fedavg_with_model(w=(size,))

    def replies():  # produced lazily, as an engine streams them
        rng = np.random.default_rng(0)
        for node in range(cohort):
            yield reply(
                node + 2,
                {"w": rng.standard_normal(size).astype(np.float32)},
                **{"num-examples": 1, "train_loss": 0.0},
            )

    tracemalloc.start()
    arrays, _ = strategy.aggregate_train(1, replies())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert tuple(arrays["w"].shape) == (size,)
    return peak


def test_aggregation_memory_does_not_grow_with_the_cohort() -> None:
    # A 1 MB model (250k float32). Holding every reply of a 200-client cohort would
    # take >= 200 MB; streaming holds the float64 sum, a reply in flight and
    # temporaries not yet collected, independent of the cohort size.
    size, model_bytes = 250_000, 250_000 * 4
    peak_40, peak_200 = _peak_aggregation_bytes(40, size), _peak_aggregation_bytes(200, size)
    assert peak_200 < 1.3 * peak_40, (
        f"peak grew from {peak_40 / 1e6:.0f} to {peak_200 / 1e6:.0f} MB"
    )
    assert peak_200 < 0.25 * 200 * model_bytes


def test_weighted_mean_is_the_float64_mean_rounded_once() -> None:
    # Products weight * value must be formed in float64: rounding each to float32
    # first changes about 40% of these means after the final cast.
    rng = np.random.default_rng(0)
    values = rng.standard_normal((50, 1000)).astype(np.float32)
    weights = rng.integers(1, 100, 50)
    mean = WeightedMean()
    for value, weight in zip(values, weights, strict=True):
        mean.add({"w": value}, int(weight))
    exact = (values.astype(np.float64) * weights[:, None]).sum(axis=0) / weights.sum()
    np.testing.assert_array_equal(mean.mean()["w"], exact.astype(np.float32))
