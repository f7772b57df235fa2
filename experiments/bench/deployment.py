"""W1a on a real localhost deployment against fedsim's inline engine: what a deployment costs.

::

    python experiments/bench/deployment.py                 # 3 repeats, 20 SuperNodes, 5 rounds
    python experiments/bench/deployment.py --repeats 1 --rounds 2 --nodes 5   # a quick look

W1a's round (``experiments.bench.workload``): FedAvg, the 105,866-parameter CNN,
20 clients of 64 synthetic samples, one local epoch of SGD (batch 32, lr 0.05).
A SuperNode is one client, so the deployed population is the cohort: ``--nodes``
SuperNodes (20), all of them in every round; W1a samples its 20 from 100, which
changes which clients train, not how much work a round is. Both systems run the
same fedsim config (the clients' data from ``workload.node_data`` through
``data.load_partition``), so they train the same model on the same data.

*deployed* is ``fedsim.deploy.localhost.LocalFederation``: a TLS SuperLink with
SuperNode authentication and its state in memory, ``--nodes`` SuperNode processes,
the run submitted with ``flwr run``. Each ClientApp call is a fresh
``flwr-clientapp`` process (one torch thread) that imports torch and fedsim before
it trains. *inline* is ``fedsim run`` (its default engine) in a fresh process.

Reported, per system (medians over repeats): start-up (deployed: the federation
up, i.e. certificates, keys, SuperLink, registrations and SuperNodes started; both:
from submitting the run to its first round, what is not a round of the run's wall
time, imports included), the first round (which pays one-time costs in-process),
and seconds per steady round, 2..R (the ServerApp's ``round_s`` in
``metrics.jsonl``). Repeats alternate the two systems; the ratios deployed/inline
are per repeat, then their median. No target: the point is to know the cost.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from experiments.bench.report import median_interval  # noqa: E402
from fedsim.deploy.localhost import ConfigValue, LocalFederation, _toml_value  # noqa: E402

DEMO = REPO / "experiments" / "configs" / "demo.toml"  # every key it sets is overridden


def settings(nodes: int, rounds: int) -> dict[str, ConfigValue]:
    """Return W1a's round as a fedsim run config (flat keys)."""
    return {
        "seed": 0,
        "rounds": rounds,
        "data.dataset": "experiments.bench.workload:central_data",
        "data.partitioner": "iid",
        "data.num_clients": nodes,
        "data.load_partition": "experiments.bench.workload:node_data",
        "model.name": "cnn",
        "client.lr": 0.05,
        "client.local_epochs": 1,
        "client.batch_size": 32,
        "strategy.name": "fedavg",
        "strategy.clients_per_round": nodes,
        "checkpoint_every": 0,
        "plot": False,
        "progress": False,
    }


def run_inline(flat: dict[str, ConfigValue], out: Path) -> dict[str, Any]:
    """Run the config with ``fedsim run`` in a fresh process (inline engine); its timings."""
    sets = [f"{key}={_toml_value(value)}" for key, value in flat.items()]
    sets += ['name="inline"', f"output_dir={json.dumps(str(out))}"]
    command = [sys.executable, "-m", "fedsim.cli", "run", str(DEMO)]
    command += [arg for setting in sets for arg in ("--set", setting)]
    begin = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - begin
    return _timings(out / "inline", wall, up_s=0.0)


def run_deployed(
    flat: dict[str, ConfigValue], out: Path, nodes: int, *, timeout_s: float
) -> dict[str, Any]:
    """Start a federation, run the config with flwr run; return its timings.

    A failed run's logs are kept in a folder of their own, named in the error.
    """
    # In-memory state: Flower 1.41's SQLite state lost replies to lock timeouts with
    # 20 SuperNodes on two cores (see LocalFederation.database); no restart here.
    federation = LocalFederation(nodes=nodes, keep=True, database=False)
    with federation:
        begin = time.perf_counter()
        run_config = {**flat, "name": "deployed", "output_dir": str(out)}
        status = federation.run(REPO, run_config, timeout_s=timeout_s)
        wall = time.perf_counter() - begin
    if status != "finished:completed":
        raise RuntimeError(f"the deployed run ended {status}; logs in {federation.logs}")
    shutil.rmtree(federation.logs.parent, ignore_errors=True)
    return _timings(out / "deployed", wall, up_s=federation.started_s)


def _timings(run: Path, wall_s: float, *, up_s: float) -> dict[str, Any]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [row["round_s"] for row in rows if row["round"] >= 1]
    return {
        "up_s": up_s,
        "to_first_round_s": wall_s - sum(rounds),
        "first_round_s": rounds[0],
        "round_s": rounds[1:],  # steady rounds: the first pays one-time costs (imports)
        "model": torch.load(run / "model.pt", weights_only=True),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the repeats and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20, help="SuperNodes = clients (20)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds one deployed run may take"
    )
    args = parser.parse_args(argv)
    # The ServerApp and ClientApps import the hooks from experiments.bench.workload.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    flat = settings(args.nodes, args.rounds)
    runs: dict[str, list[dict[str, Any]]] = {"inline": [], "deployed": []}
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-deploy-") as tmp:
        for repeat in range(args.repeats):
            out = Path(tmp) / str(repeat)
            runs["inline"].append(run_inline(flat, out))
            runs["deployed"].append(run_deployed(flat, out, args.nodes, timeout_s=args.timeout))
            print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    report = _report(runs, args)
    print(report["text"])
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in report.items() if k != "text"}, indent=2))
    return 0


def _report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    lines = [
        f"W1a round on {args.nodes} clients, {args.rounds} rounds x {args.repeats} repeats "
        f"({os.cpu_count()} cores); medians over repeats, steady rounds are 2..{args.rounds}",
        f"{'system':<9} {'up s':>6} {'to round 1 s':>13} {'round 1 s':>10} "
        f"{'steady round s':>15} {'range':>16}",
    ]
    numbers: dict[str, Any] = {}
    for system, results in runs.items():
        steady = [r for result in results for r in result["round_s"]]
        row = {
            key: statistics.median(result[key] for result in results)
            for key in ("up_s", "to_first_round_s", "first_round_s")
        }
        numbers[system] = {**row, "round_s": steady}
        lines.append(
            f"{system:<9} {row['up_s']:>6.1f} {row['to_first_round_s']:>13.1f} "
            f"{row['first_round_s']:>10.2f} {statistics.median(steady):>15.3f} "
            f"{min(steady):>7.3f}-{max(steady):<8.3f}"
        )
    pairs = list(zip(runs["deployed"], runs["inline"], strict=True))
    ratios = [statistics.median(d["round_s"]) / statistics.median(i["round_s"]) for d, i in pairs]
    interval = median_interval(ratios)
    spread = ""
    if interval:
        spread = f", range over repeats {interval[0]:.0f}-{interval[1]:.0f}"
    lines.append(
        f"deployed/inline, steady time per round: {statistics.median(ratios):.0f}x{spread}"
    )
    start = [(d["up_s"] + d["to_first_round_s"]) / i["to_first_round_s"] for d, i in pairs]
    lines.append(
        "deployed/inline, start (federation up + to round 1, against a fresh `fedsim run` "
        f"process to round 1): {statistics.median(start):.0f}x"
    )
    gaps = [
        max((d["model"][k] - i["model"][k]).abs().max().item() for k in i["model"])
        for d, i in pairs
    ]
    lines.append(
        f"largest weight difference, deployed vs inline: {max(gaps):.2e} (inline uses every "
        "core's torch threads, each ClientApp one: float sums in another order)"
    )
    numbers.update(ratio_round=ratios, ratio_start=start, weight_gap=gaps)
    for system in runs:
        for result in runs[system]:
            result.pop("model")
    return {"text": "\n".join(lines), **numbers}


if __name__ == "__main__":
    raise SystemExit(main())
