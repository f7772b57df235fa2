"""A short soak: 20 rounds on each engine, and memory must not grow with rounds.

``experiments/soak.py`` runs 200 rounds over 10^5 clients; this is its short form, on a
population the warm-up uses up, so that what is left to grow is a leak.
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # experiments/ is not an installed package
    sys.path.insert(0, str(REPO))

from experiments import soak  # noqa: E402

ROUNDS, WARMUP = 24, 8
CLIENTS, PER_ROUND = 1_000, 500
K_SE = 3.0


def test_least_squares_recovers_a_known_line_and_its_standard_error() -> None:
    # Prepare: y = 2 + 0.5 x + e with residuals +1, -1, -1, +1 (orthogonal to 1 and x).
    xs = [0.0, 1.0, 2.0, 3.0]
    ys = [2 + 0.5 * x + e for x, e in zip(xs, [1.0, -1.0, -1.0, 1.0], strict=True)]
    # Execute
    (b,), (se,) = soak.least_squares(ys, xs)
    # Assert: sigma^2 = 4 / (4 - 2) = 2, Sxx = 5, so SE = sqrt(2 / 5).
    assert b == pytest.approx(0.5)
    assert se == pytest.approx((2 / 5) ** 0.5)


def test_memory_fit_separates_node_contexts_from_a_leak() -> None:
    # Prepare: 1 kB per new node, nodes growing like an unused-up population, no leak.
    rounds = list(range(1, 41))
    nodes = [int(10_000 * (1 - 0.97**r)) for r in rounds]
    mb = [300 + n * 1024 / soak.MB for n in nodes]
    # Execute
    fit = soak.memory_fit(mb, rounds, nodes)
    # Assert: the raw slope sees the contexts, the leak slope does not.
    assert fit["rss_slope_mb_per_100"] > 10
    assert fit["leak_slope_mb_per_100"] == pytest.approx(0, abs=1e-6)
    assert fit["bytes_per_node"] == pytest.approx(1024, rel=1e-6)


@pytest.mark.slow
# The threads engine keeps nodes in the same registry; it passed this test at 31-40 s and
# the 200-round soak (docs/reliability.md), and is left out of make test for its time.
@pytest.mark.parametrize("engine", ["inline"])
def test_memory_does_not_grow_with_rounds(engine: str) -> None:
    """Memory over 16 rounds after an 8-round warm-up stays within 1 MB per 100 rounds.

    Two things make 20 rounds a fair test. The population (1,000 nodes, 500 a round) is used
    up in warm-up: each node is left unsampled with probability 2^-8, so about 4 nodes come
    new after it, while on 10^5 nodes every new node's context (about 1 kB) would look like a
    leak. And memory is read after ``gc.collect()``, so garbage awaiting a collection does not
    either. What is left moves in steps of the allocator's chunks (a 128 kB step over 16 rounds
    is 0.8 MB per 100 rounds), so the bound is 1 MB per 100 rounds plus 3 standard errors
    of the slope: a single step passes, a steady growth of a few MB per 100 rounds does not
    (its points sit on the line and its standard error is small). The 200-round soak holds
    the 1 MB bound without the allowance.

    Ray is left out: its driver's RSS grows 3.5 MB per 100 rounds in the 200-round soak and
    12 in this short form, with no growth in Python objects (tracemalloc), so the test would
    fail for a native cause not yet found, and it costs 20-26 s here.
    """
    # Execute
    result = soak.soak(
        soak.Options(
            engine=engine,
            clients=CLIENTS,
            per_round=PER_ROUND,
            rounds=ROUNDS,
            warmup=WARMUP,
            progress_every=0,
        )
    )
    summary = result["summary"]
    # Assert
    assert summary["measured_rounds"] == ROUNDS - WARMUP
    assert CLIENTS - summary["nodes_materialized"] <= 20  # the warm-up used the population up
    slope, se = summary["leak_slope_mb_per_100"], summary["leak_slope_se_mb_per_100"]
    assert slope <= soak.SLOPE_BOUND_MB + K_SE * se, (slope, se, result["series"])
