"""What refusing non-finite arrays costs the engines: W1b-0 rounds with the check on and off.

::

    python experiments/bench/finite_check.py              # 30 pairs of rounds
    python experiments/bench/finite_check.py --pairs 60

Every fedsim engine turns a reply whose arrays hold a NaN or an Inf into an error
reply (``check_finite_arrays``, on by default), one pass over each reply's
arrays. W1b-0 (100 of 1,000 clients, no local training: the clients load data and
the model and reply) is where that pass weighs most against a round. Two inline
grids, one checking and one not, run rounds in pairs in one process, the order
alternating from pair to pair, so the machine's drift cancels; the script prints
the median ratio of paired rounds with a distribution-free interval, and the
check's own time per reply, measured alone.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from flwr.app import ArrayRecord, RecordDict  # noqa: E402

from experiments.bench.report import median_interval  # noqa: E402
from experiments.bench.systems import train_config, w1_task  # noqa: E402
from experiments.bench.workload import SEED, WORKLOADS, initial_state  # noqa: E402
from fedsim.arrays import to_array_record  # noqa: E402
from fedsim.clients import make_client_app  # noqa: E402
from fedsim.engine import InlineGrid  # noqa: E402
from fedsim.engine.execute import non_finite_array  # noqa: E402
from fedsim.loop import run_rounds  # noqa: E402
from fedsim.strategies import FedAvg  # noqa: E402


def round_seconds(grid: InlineGrid, strategy: FedAvg, arrays: ArrayRecord, round_: int) -> float:
    """Run round ``round_`` of W1b-0 on ``grid``; return its seconds."""
    start = time.perf_counter()
    run_rounds(
        strategy=strategy,
        grid=grid,
        initial_arrays=arrays,
        num_rounds=1,
        train_config=train_config(SEED + round_, WORKLOADS["W1b-0"]),
    )
    return time.perf_counter() - start


def main() -> None:
    """Run the paired rounds and print the ratio with its interval."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=30)
    args = parser.parse_args()
    workload = WORKLOADS["W1b-0"]
    k, n = workload.clients_per_round, workload.num_clients
    strategy = FedAvg(
        seed=SEED, fraction_train=k / n, min_train_nodes=k, fraction_evaluate=0.0,
        min_evaluate_nodes=0, min_available_nodes=k,
    )  # fmt: skip
    arrays = ArrayRecord(initial_state(SEED))
    app = make_client_app(w1_task())
    grids = {
        checked: InlineGrid(app, num_nodes=n, check_finite_arrays=checked)
        for checked in (True, False)
    }
    round_seconds(grids[True], strategy, arrays, 0)  # warm-up: caches, allocator
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for pair in range(args.pairs):
        for checked in (True, False) if pair % 2 else (False, True):
            seconds[checked].append(round_seconds(grids[checked], strategy, arrays, pair))
    ratios = [on / off for on, off in zip(seconds[True], seconds[False], strict=True)]
    interval = median_interval(ratios)
    assert interval is not None
    low, high, coverage = interval
    reply = to_array_record({name: t.numpy() for name, t in initial_state(SEED).items()})
    content, calls = RecordDict({"arrays": reply}), 2000
    start = time.perf_counter()
    for _ in range(calls):
        non_finite_array(content)
    per_reply_ms = (time.perf_counter() - start) / calls * 1e3
    print(f"W1b-0 inline, {args.pairs} pairs of rounds ({k} clients each)")
    print(f"  round s, check on:  median {statistics.median(seconds[True]):.4f}")
    print(f"  round s, check off: median {statistics.median(seconds[False]):.4f}")
    print(
        f"  on / off: median {statistics.median(ratios):.4f} "
        f"({coverage:.0%} interval {low:.4f}-{high:.4f})"
    )
    print(f"  the check alone: {per_reply_ms:.3f} ms per reply (W1's 105,866 float32s)")


if __name__ == "__main__":
    main()
