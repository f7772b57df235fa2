"""Side-by-side benchmark: fedsim against a plain PyTorch floor, Flower and pfl.

::

    python experiments/bench/engines.py                      # all systems, W1a and W1b, scale
    python experiments/bench/engines.py --json bench.json    # also write the table as JSON
    python experiments/bench/engines.py --systems floor,inline --workloads W1a --rounds 2
    python experiments/bench/engines.py --scale              # only the scale section
    python experiments/bench/engines.py --systems floor,inline,vmap --workloads W1a,W1b,D1b \
        --no-scale                                           # the vmap engine's rows

Systems, all running workload W1, and D1b (W1b with an MLP 11x smaller, on digits), from
``workload.py``:

============  ==============================================================================
floor         W1 as the plainest FedAvg loop in PyTorch, one process, no Flower
floor-malloc  the floor with glibc's default (adaptive) malloc thresholds; every other system
              runs with them pinned (see PINNED_MALLOC), as ``fedsim run`` pins its own
inline        fedsim's ``InlineGrid`` and seeded streaming ``FedAvg``, driven by ``run_rounds``
threads       fedsim's ``ThreadedGrid``: 2 worker threads of 1 torch thread each, one process
vmap          fedsim's ``VmapGrid``: each round's cohort as one batched ``torch.func`` computation
ray           fedsim's ``RayGrid``: 2 actors of 1 CPU each
flower        Flower's ``run_simulation`` (Ray backend, 1 CPU per client: 2 actors)
pfl           Apple's pfl 0.6 (``SimulatedBackend``, in process); the ``bench`` extra
============  ==============================================================================

floor, inline, threads, vmap, ray and pfl train the same cohorts on the same batches
(fedsim's seeding), so they must end on the same weights: the "max |w - floor|" column
checks it on every run (vmap within float rounding: its batched kernels add in another
order). Flower's FedAvg samples its own cohorts. ``--device cuda`` trains the clients of
floor, inline, threads and vmap on the GPU and gives each Ray actor a quarter of it
(``gpu_check.sh`` runs that check).

Every run is its own interpreter (this file re-invoked with ``--run``), so imports, Ray and
torch threads never leak between systems; the parent samples the resident memory of the
child's whole process tree every 50 ms. Each system runs ``--repeat`` times (9; ray and flower
``--repeat-ray``, 5), interleaved with the others, every other repetition in reverse order
(``RUN_ORDER``: the in-process systems right beside the floor); the table shows medians over
the runs, and each ratio to the floor is the median of the ratios to the floor's run of the
same repetition (close in time, so the machine's drift largely cancels). "steady min-max s"
shows how much the runs varied; each target also prints a distribution-free interval around
its median ratio and says "within noise" where that interval holds the target's bound. On a
2-core VM single runs of the same code differ by 15% on a quiet day and by up to 50% on a busy
one, while fedsim inline and pfl sit within 10% of the floor: 9 runs of the in-process
systems narrow the interval to the 2nd to 8th of 9 ratios (96% coverage) instead of 5 runs'
min to max, and ``--systems floor,inline,pfl --repeat 21 --no-scale`` to the 6th to 16th of
21 (97%). Children
run with glibc's malloc thresholds pinned (``PINNED_MALLOC``; ``--system-malloc`` to not), so
that page faults from allocator history do not decide the comparison.

Columns
-------
total s         From the start of the system's work (modules already imported) to the final
                global model: model, data functions, strategy and engine set-up, Ray start-up
                (ray, flower), every round, and Ray shut-down (Flower's ``run_simulation``
                returns only after it, so the ray row includes it too). Not imports: import s.
steady round s  Mean of rounds 2-5; a round is the time between consecutive round boundaries
                as the server sees them (round 1 alone if there is one round).
peak RSS MB     Peak over the child's whole life (imports included) of the summed resident set
                of the child and its descendants (Ray's GCS, raylet, workers). Pages shared
                between processes (torch's libraries in every Ray worker) count once per
                process, as ``ps`` shows them.
import s        torch and the system's framework (flwr, ray, pfl) imported.
start-up s      Start of work to the start of round 1. Flower's ServerApp starts round 1 while
                its Ray backend is still starting, so its start-up is inside round 1 ("-").
                For fedsim ray, each run's line and the JSON rows also give ``ray_init_s``
                (``ray.init``) and ``ray_startup_s`` (the 2-actor pool ready after it: what
                the actors' imports cost), printed as "Ray start-up" under the table.
threads         torch intra-op threads where clients train: torch's default (one per core) in
                the floor, inline and pfl; what the engine sets in its worker threads or Ray
                actors, read back from the clients' replies.

The scale section runs fedsim inline on a tiny model over populations of 10^3 and 10^6
(start-up and memory must not grow with the population), and on a 1M-parameter model at
cohorts of 10 and 500 (memory must not grow with the cohort: aggregation streams).

pfl 0.6 comes with the ``bench`` extra: ``make bench`` installs it and runs this file, or
``pip install -c constraints.txt -e '.[bench]'``. Without it the pfl rows say how to get it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# measure and report load no torch; systems, next, starts a child's import clock before torch.
from experiments.bench.measure import RESULT, SKIPPED, spawn  # noqa: E402
from experiments.bench.report import (  # noqa: E402
    OWN_SAMPLING,
    format_scale,
    format_table,
    median_interval,
    paired_ratios,
    targets,
)
from experiments.bench.systems import (  # noqa: E402
    SystemUnavailable,
    Timing,
    run_floor,
    run_flower,
    run_inline,
    run_ray,
    run_scale_case,
    run_threads,
    run_vmap,
    torch,
)
from experiments.bench.systems_pfl import run_pfl  # noqa: E402
from experiments.bench.workload import ROUNDS, SCALE_CASES, SEED, WORKLOADS  # noqa: E402
from fedsim.allocator import TUNABLES  # noqa: E402

SYSTEMS = ("floor", "floor-malloc", "inline", "threads", "vmap", "ray", "flower", "pfl")
# The in-process systems first, right beside the floor.
RUN_ORDER = ("floor", "inline", "vmap", "threads", "pfl", "floor-malloc", "ray", "flower")
RAY_SYSTEMS = ("ray", "flower")  # they start Ray: 5-20 s a run; --repeat-ray times
LABELS = {
    "floor": "floor (PyTorch loop)",
    "floor-malloc": "floor, glibc's default malloc",
    "inline": "fedsim inline",
    "threads": "fedsim threads (2 workers)",
    "vmap": "fedsim vmap (batched cohort)",
    "ray": "fedsim ray (2 actors)",
    "flower": "flower run_simulation",
    "pfl": "pfl 0.6",
}
RUNNERS: dict[str, Callable[..., Timing]] = {
    "floor": run_floor,
    "floor-malloc": run_floor,
    "inline": run_inline,
    "threads": run_threads,
    "vmap": run_vmap,
    "ray": run_ray,
    "flower": run_flower,
    "pfl": run_pfl,
}
# Each row's median of these, over the system's runs (the ray_ ones: fedsim ray only).
MEDIANS = (
    "total_s", "steady_round_s", "peak_rss_mb", "import_s", "startup_s", "ray_init_s",
    "ray_startup_s",
)  # fmt: skip
# glibc's default malloc adapts its mmap threshold to what a process has freed so far, so
# whether torch's activation buffers are mmap'ed and faulted in afresh at every step depends
# on the process's allocation history. Page faults cost 1-10 us on a VM: the floor ran 25-30%
# slower in some runs than in others, more than the overheads measured. Fixed thresholds
# (fedsim.allocator's, which `fedsim run` sets for itself) take the allocator out of the
# comparison; --system-malloc puts it back.
PINNED_MALLOC = {"GLIBC_TUNABLES": TUNABLES}
# The floor once more with glibc's own (adaptive) thresholds, whatever the others run with:
# what the pinning is worth, measured side by side (fedsim run pins by default).
SYSTEM_ENV = {"floor-malloc": {"GLIBC_TUNABLES": ""}}


# --------------------------------------------------------------------------- the runs


def child_main(args: argparse.Namespace) -> int:
    """Run one system (or scale case) in this process and print its result line."""
    try:
        if args.run == "scale":
            timing = run_scale_case(SCALE_CASES[args.case], seed=args.seed)
        else:
            runner = RUNNERS[args.run]
            workload = WORKLOADS[args.workload]
            timing = runner(workload, rounds=args.rounds, seed=args.seed, device=args.device)
    except SystemUnavailable as exc:
        print(SKIPPED + str(exc), flush=True)
        return 0
    if args.save_state and timing.final_state is not None:
        torch.save(timing.final_state, args.save_state)
    print(RESULT + json.dumps(timing.summary()), flush=True)
    return 0


def run_systems(
    systems: Sequence[str],
    workloads: Sequence[str],
    *,
    rounds: int,
    seed: int,
    repeat: int,
    repeat_ray: int,
    env: dict[str, str],
    device: str = "cpu",
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run each system ``repeat`` times per workload, interleaved; return rows and notes.

    A repetition runs the in-process systems first, next to the floor, and every
    other repetition runs them in reverse order: the machine's speed drifts over
    tens of seconds, and a floor run right beside each system's run (on either
    side, alternately) pairs them under the same conditions. The systems that
    start Ray run in the first ``repeat_ray`` repetitions only: their runs are
    the longest and their ratios lie far from any target's bound.
    """
    rows, notes = [], []
    order = [s for s in RUN_ORDER if s in systems]
    with tempfile.TemporaryDirectory() as states:
        for name in workloads:
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
            skipped: set[str] = set()  # skipped or failed once: not tried again
            for attempt in range(max(repeat, repeat_ray)):
                for system in order if attempt % 2 == 0 else order[::-1]:
                    wanted = repeat_ray if system in RAY_SYSTEMS else repeat
                    if system in skipped or attempt >= wanted:
                        continue
                    state = Path(states) / f"{system}-{attempt}.pt"
                    result = _run_once(
                        system, name, attempt, state, rounds=rounds, seed=seed, env=env,
                        device=device,
                    )  # fmt: skip
                    if isinstance(result, str):
                        skipped.add(system)
                        notes.append(f"{system} on {name}: {result}")
                    else:
                        runs[system].append(result)
            for system, results in runs.items():
                for result in results:
                    floor_state = Path(states) / f"floor-{result['attempt']}.pt"
                    result["max_abs_diff_to_floor"] = _weight_gap(
                        system, Path(states) / f"{system}-{result['attempt']}.pt", floor_state
                    )
            rows += _rows(name, runs)
    return rows, notes


def _run_once(
    system: str,
    name: str,
    attempt: int,
    state: Path,
    *,
    rounds: int,
    seed: int,
    env: dict[str, str],
    device: str = "cpu",
) -> dict[str, Any] | str:
    """Run one system once in a child; return its result, or why there is none."""
    print(f"[bench] {name} run {attempt + 1}: {LABELS[system]} ...", end="", flush=True)
    run = spawn(
        ["--run", system, "--workload", name, "--rounds", str(rounds), "--seed", str(seed)]
        + ["--save-state", str(state), "--device", device],
        env_extra={**env, **SYSTEM_ENV.get(system, {})},
    )
    if run.result is None:
        why = f"skipped ({run.skipped})" if run.skipped else f"FAILED: {run.error}"
        print(f" {why}", flush=True)
        return why
    run.result.update(peak_rss_mb=run.peak_rss_mb, attempt=attempt)
    ray_part = ""
    if run.result.get("ray_startup_s") is not None:
        init_s, pool_s = run.result["ray_init_s"], run.result["ray_startup_s"]
        ray_part = f", ray.init {init_s:.2f} s + pool {pool_s:.2f} s"
    print(
        f" total {run.result['total_s']:.2f} s, steady round "
        f"{run.result['steady_round_s']:.3f} s, peak RSS {run.peak_rss_mb:.0f} MB{ray_part}",
        flush=True,
    )
    return run.result


def _weight_gap(system: str, state: Path, floor_state: Path) -> float | None:
    """Return max |final weights - the floor's| (None where cohorts differ by design)."""
    if system in OWN_SAMPLING or not (state.exists() and floor_state.exists()):
        return None
    mine, floor = torch.load(state), torch.load(floor_state)
    return max(float((mine[k].float() - floor[k]).abs().max()) for k in floor)


def _rows(name: str, runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Summarize each system's runs: medians, and ratios paired with the floor's runs.

    A ratio is the median, over repetitions, of this system's value over the
    floor's value in the same repetition: the runs are interleaved, so each pair
    ran under the same machine conditions and drift cancels out. Its interval
    (``report.median_interval``: low, high, coverage) shows what noise is left.
    """
    rows = []
    for system, results in runs.items():
        if not results:
            continue
        row: dict[str, Any] = {"system": system, "label": LABELS[system], "workload": name}
        for key in MEDIANS:
            values = [r[key] for r in results if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        steady = [r["steady_round_s"] for r in results]
        row["steady_round_range_s"] = [min(steady), max(steady)]
        for key in ("total", "steady_round"):
            ratios = paired_ratios(results, runs.get("floor", []), f"{key}_s")
            row[f"{key}_ratio_to_floor"] = statistics.median(ratios) if ratios else None
            row[f"{key}_ratio_interval"] = median_interval(ratios)
        gaps = [r["max_abs_diff_to_floor"] for r in results]
        row["max_abs_diff_to_floor"] = None if None in gaps else max(gaps)
        row["threads"], row["runs"] = results[0]["threads"], results
        rows.append(row)
    return rows


def run_scale(*, seed: int, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Run each scale case in its own process; return results by case name."""
    results = {}
    for name, case in SCALE_CASES.items():
        print(f"[bench] scale: fedsim inline, {case.label} ...", end="", flush=True)
        run = spawn(["--run", "scale", "--case", name, "--seed", str(seed)], env_extra=env)
        if run.result is None:
            print(f" FAILED: {run.error}", flush=True)
            continue
        results[name] = {"case": name, **vars(case), **run.result, "peak_rss_mb": run.peak_rss_mb}
        print(f" start-up {run.result['startup_s']:.2f} s, peak RSS {run.peak_rss_mb:.0f} MB")
    return results


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; ``--run`` is the child side, used by the benchmark itself."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--repeat", type=int, default=9, help="runs per in-process system (median shown)"
    )
    parser.add_argument(
        "--repeat-ray",
        type=int,
        help="runs of the systems that start Ray (ray, flower); default min(5, --repeat)",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--device", default="cpu", help="where clients train: cpu or cuda (flower, pfl: cpu only)"
    )
    parser.add_argument("--json", type=Path, help="also write the table's rows here")
    parser.add_argument(
        "--system-malloc", action="store_true", help="leave glibc's malloc tuning to the system"
    )
    section = parser.add_mutually_exclusive_group()
    section.add_argument("--scale", action="store_true", help="run only the scale section")
    section.add_argument("--no-scale", action="store_true", help="skip the scale section")
    parser.add_argument("--run", choices=[*SYSTEMS, "scale"], help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(SCALE_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--save-state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option, known in (("systems", SYSTEMS), ("workloads", tuple(WORKLOADS))):
        values = [v for v in getattr(args, option).split(",") if v]
        if unknown := sorted(set(values) - set(known)):
            parser.error(f"--{option}: unknown {unknown}; choose from {', '.join(known)}")
        setattr(args, option, [v for v in known if v in values])  # floor first
    if args.repeat_ray is None:
        args.repeat_ray = min(5, args.repeat)
    if min(args.rounds, args.repeat, args.repeat_ray) < 1:
        parser.error("--rounds, --repeat and --repeat-ray must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 1 if a system failed (a skipped system is no failure)."""
    args = parse_args(argv)
    if args.run:
        return child_main(args)
    env = {} if args.system_malloc else PINNED_MALLOC
    malloc = "system default" if args.system_malloc else PINNED_MALLOC["GLIBC_TUNABLES"]
    print(
        f"[bench] {os.cpu_count()} CPUs, torch {torch.__version__}, clients on {args.device}; "
        f"{args.rounds} rounds, "
        f"seed {args.seed}, {args.repeat} run(s) per system ({args.repeat_ray} of ray and "
        f"flower); malloc: {malloc}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if not args.scale:
        rows, notes = run_systems(
            args.systems,
            args.workloads,
            rounds=args.rounds,
            seed=args.seed,
            repeat=args.repeat,
            repeat_ray=args.repeat_ray,
            env=env,
            device=args.device,
        )
    scale = {} if args.no_scale else run_scale(seed=args.seed, env=env)
    for row in [*rows, *scale.values()]:
        row["malloc"], row["device"] = malloc, args.device
    if rows:
        print("\n" + format_table(rows))
    for row in rows:
        if row.get("ray_startup_s") is not None:
            print(
                f"Ray start-up, {row['workload']} (median of {len(row['runs'])}): pool ready "
                f"{row['ray_startup_s']:.2f} s after ray.init ({row['ray_init_s']:.2f} s)"
            )
    for note in notes:
        print("  " + note.splitlines()[0])
    if scale:
        print("\nSCALE (fedsim inline, one process per case)\n" + format_scale(scale))
    print("\nTARGETS")
    for line in targets(rows, scale):
        print("  " + line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        if scale:
            scale_path = args.json.with_suffix(".scale.json")
            scale_path.write_text(json.dumps(list(scale.values()), indent=2) + "\n")
        print(f"\n[bench] wrote {args.json}", flush=True)
    return int(any("FAILED" in note for note in notes))


if __name__ == "__main__":
    sys.exit(main())
