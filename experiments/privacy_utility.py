"""Privacy-utility trade-off on digits: no DP, central DP, local DP, and both.

Four mechanisms train the same federation, each at several ε:

- no DP: plain FedAvg, the utility ceiling;
- central DP (DP-FedAvg, McMahan et al. 2018, arXiv 1710.06963): the server
  clips each update to S, adds N(0, (zS)²) to the sum and divides by C̄; z is
  calibrated (RDP, Poisson sampling at q = C̄/N over all rounds) to the target
  ε at δ, and the table shows the ε the run itself reports;
- local DP (Bhowmick et al. 2018, arXiv 1812.00984): each client clips its
  update to r and sends PrivUnit2(direction; ε₁) x ScalarDP(norm; ε₂), so each
  report is (ε₁ + ε₂)-LDP; ε₁ is swept, ε₂ fixed;
- local + central DP: one LDP setting, with central DP on top, sweeping central ε.

The privacy unit is a client's whole data (user-level DP) in every mechanism.
Central ε is for the whole run against anyone who sees the released models; LDP
ε is per report against the server itself, and a client that reports k times is
k(ε₁ + ε₂)-LDP by basic composition (the table shows k = the expected count).
Outside every guarantee: the example counts clients send in the clear (with local
DP alone, FedAvg weights the reports by them; central DP divides by C̄ instead).

The hyperparameters come from one non-private run, not from tuning per ε (which
would itself spend privacy): the learning rate, and S = r = 1, about the median
norm of a client's update late in that run. On top of LDP, central DP clips at
S = r/m (the norm of a report whose magnitude is r): a report's direction is
unbiased and independent of its magnitude, so this clipping only shrinks the
magnitude, and it avoids the noise of S = max report norm, tens of times larger.

``python experiments/privacy_utility.py`` runs it all (5 seeds) into
``runs/privacy_utility/``; ``--quick`` is a smoke test (1 seed, 5 rounds) into
``runs/privacy_utility-quick/``. A full result is replaced only with ``--overwrite``
(``result_folder.py``).
"""

import argparse
import csv
import json
import logging
import math
import multiprocessing
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from result_folder import RESULTS_FILE, add_folder_arguments, folder_of, refuse_to_replace

from fedsim.clients.private_update import SeparatedPrivatization, norm_bound
from fedsim.config import RunConfig, load_config
from fedsim.experiment import build_task, federated_data
from fedsim.privacy.accounting import calibrate_noise_multiplier
from fedsim.privacy.privunit import calibrate_privunit
from fedsim.runner import run_experiment

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)

BASE_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.toml"
MECHANISMS = {
    "none": "no DP",
    "central": "central DP",
    "ldp": "local DP",
    "ldp+central": "local + central DP",
}


@dataclass(frozen=True)
class Settings:
    """The federation, the training recipe and the ε sweeps."""

    seeds: tuple[int, ...]
    rounds: int
    num_clients: int = 500
    cohort: int = 100
    lr: float = 1.0
    clip_norm: float = 1.0  # S, central DP
    local_clip: float = 1.0  # r, local DP
    delta: float = 1e-5
    central_epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    direction_epsilons: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)  # ε₁
    magnitude_epsilon: float = 1.0  # ε₂
    stacked_direction_epsilon: float = 16.0  # ε₁ of local + central DP
    magnitude_levels: int = 10

    @property
    def sample_rate(self) -> float:
        """Return q = C̄ / N, the Poisson rate of central DP's cohorts."""
        return self.cohort / self.num_clients

    @property
    def expected_reports(self) -> float:
        """How many rounds a client takes part in, on average."""
        return self.rounds * self.sample_rate


FULL = Settings(seeds=(0, 1, 2, 3, 4), rounds=50)
QUICK = Settings(seeds=(0,), rounds=5)


@dataclass(frozen=True)
class Job:
    """One run: a mechanism at one point of its sweep, on one seed."""

    mechanism: str
    epsilon: float | None  # the sweep's value: central target ε, ε₁ for local DP, None
    seed: int
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    direction_epsilon: float = 0.0

    @property
    def name(self) -> str:
        """A run name unique within the sweep."""
        sweep = "" if self.epsilon is None else f"-eps{self.epsilon:g}"
        return f"{self.mechanism.replace('+', '-')}{sweep}-seed{self.seed}"


def config_for(job: Job, s: Settings, out: Path) -> RunConfig:
    """Return the run's config: the shared recipe plus the job's privacy keys."""
    overrides = [
        f"name={job.name}", f"seed={job.seed}", f"rounds={s.rounds}",
        f"output_dir={out / 'runs'}", "progress=false", "plot=false", "checkpoint_every=0",
        "data.partitioner=iid", f"data.num_clients={s.num_clients}", "model.name=logreg",
        f"strategy.clients_per_round={s.cohort}", f"client.lr={s.lr}",
        "client.local_epochs=1", "client.batch_size=16",
    ]  # fmt: skip
    if "central" in job.mechanism:
        overrides += [
            "privacy.central_dp=true", f"privacy.noise_multiplier={job.noise_multiplier}",
            f"privacy.clip_norm={job.clip_norm}", "privacy.sampling=poisson",
            "privacy.accountant=rdp", f"privacy.delta={s.delta}",
        ]  # fmt: skip
    if "ldp" in job.mechanism:
        overrides += [
            "privacy.local_dp=true", f"privacy.epsilon_direction={job.direction_epsilon}",
            f"privacy.epsilon_magnitude={s.magnitude_epsilon}",
            f"privacy.local_clip={s.local_clip}", f"privacy.magnitude_levels={s.magnitude_levels}",
        ]  # fmt: skip
    return load_config(BASE_CONFIG, overrides)


@dataclass(frozen=True)
class Sizes:
    """The problem's sizes, for the notes and PrivUnit's calibration."""

    dim: int  # d, model parameters: PrivUnit's error grows with d/ε₁
    train_examples: int


def sizes(s: Settings, out: Path) -> Sizes:
    """Return the model's size and the number of training examples (first seed's split)."""
    config = config_for(Job("none", None, s.seeds[0]), s, out)
    model = build_task(config).model_fn()
    train = federated_data(config.data, config.seed).central.train_y
    return Sizes(sum(p.numel() for p in model.parameters()), len(train))


def stacked_clip(s: Settings, dim: int) -> float:
    """S on top of LDP: r/m, the norm of a report whose ScalarDP magnitude is r."""
    return s.local_clip * calibrate_privunit(epsilon=s.stacked_direction_epsilon, dim=dim).inv_m


def build_jobs(s: Settings, dim: int) -> list[Job]:
    """Every (mechanism, ε, seed), with z calibrated to each central target ε."""
    z = {
        eps: calibrate_noise_multiplier(
            target_epsilon=eps, delta=s.delta, sample_rate=s.sample_rate, num_steps=s.rounds
        )
        for eps in s.central_epsilons
    }
    stacked = stacked_clip(s, dim)
    jobs = []
    for seed in s.seeds:
        jobs.append(Job("none", None, seed))
        jobs += [Job("central", e, seed, z[e], s.clip_norm) for e in s.central_epsilons]
        jobs += [Job("ldp", e, seed, direction_epsilon=e) for e in s.direction_epsilons]
        jobs += [
            Job("ldp+central", e, seed, z[e], stacked, s.stacked_direction_epsilon)
            for e in s.central_epsilons
        ]
    return jobs


def mute_expected_warnings() -> None:
    """Mute the warnings every run would print, for readable progress lines.

    Flower warns once per run that clients do not evaluate (the server does);
    Opacus warns when the best RDP order is its largest, i.e. the reported ε is
    a valid but slightly loose upper bound (the calibration uses the same bound).
    """
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


def init_worker() -> None:
    """Use one torch thread per process (the pool uses the cores); mute expected warnings."""
    torch.set_num_threads(1)
    mute_expected_warnings()


def run_job(job: Job, s: Settings, out: Path) -> dict[str, Any]:
    """Run one job; return it with its summary and per-round test accuracy."""
    config = config_for(job, s, out)
    # main() has refused a folder that holds a result, so a run folder already here
    # is a stopped sweep's or a smoke test's, to be replaced.
    summary = run_experiment(config, overwrite=True)
    with (config.run_dir / "metrics.jsonl").open() as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return {
        **asdict(job),
        "name": job.name,
        "accuracy": summary["accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "reported_epsilon": summary["epsilon"],
        "delta": summary["delta"],
        "accuracy_per_round": [r.get("central_accuracy") for r in rows],
        "seconds": summary["wall_time_s"],
    }


def run_all(jobs: Sequence[Job], s: Settings, out: Path, processes: int) -> list[dict[str, Any]]:
    """Run the jobs on a process pool, printing a line per finished run."""
    runs = []
    # spawn, not fork: the children start without the parent's torch threads.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=init_worker) as pool:
        futures = [pool.submit(run_job, job, s, out) for job in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            run = future.result()
            runs.append(run)
            print(
                f"[{done}/{len(jobs)}] {run['name']:28} final acc {run['accuracy']:.3f}, "
                f"reported ε {run['reported_epsilon']}, {run['seconds']:.1f} s",
                flush=True,
            )
    order = {(j.mechanism, j.epsilon, j.seed): i for i, j in enumerate(jobs)}
    return sorted(runs, key=lambda r: order[r["mechanism"], r["epsilon"], r["seed"]])


@dataclass(frozen=True)
class Row:
    """One mechanism at one sweep value, over seeds (mean and population std)."""

    mechanism: str
    sweep_epsilon: float | None
    central_epsilon: float | None  # reported by the runs at δ (mean over seeds)
    ldp_epsilon: float  # ε₁ + ε₂ per report; 0 without local DP
    ldp_epsilon_composed: float  # x the expected number of reports per client
    noise_multiplier: float
    clip_norm: float
    noise_std_on_mean: float  # z S / C̄ per coordinate
    final_accuracy: float
    final_accuracy_std: float
    seeds: int


def summarize(runs: Sequence[dict[str, Any]], s: Settings) -> list[Row]:
    """Group the runs by (mechanism, ε) and average over seeds."""
    grouped: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[run["mechanism"], run["epsilon"]].append(run)
    rows = []
    for (mechanism, epsilon), group in grouped.items():
        first = group[0]
        reported = [r["reported_epsilon"] for r in group if r["reported_epsilon"] is not None]
        ldp = first["direction_epsilon"] + s.magnitude_epsilon if "ldp" in mechanism else 0.0
        accuracy = [r["accuracy"] for r in group]
        rows.append(
            Row(
                mechanism=mechanism,
                sweep_epsilon=epsilon,
                central_epsilon=float(np.mean(reported)) if reported else None,
                ldp_epsilon=ldp,
                ldp_epsilon_composed=ldp * s.expected_reports,
                noise_multiplier=first["noise_multiplier"],
                clip_norm=first["clip_norm"],
                noise_std_on_mean=first["noise_multiplier"] * first["clip_norm"] / s.cohort,
                final_accuracy=float(np.mean(accuracy)),
                final_accuracy_std=float(np.std(accuracy)),
                seeds=len(group),
            )
        )
    return rows


def epsilon_mismatches(runs: Sequence[dict[str, Any]], tolerance: float = 0.05) -> list[str]:
    """Return the central-DP runs whose reported ε is not within [target - tol, target]."""
    return [
        f"{r['name']}: target {r['epsilon']:g}, reported {r['reported_epsilon']}"
        for r in runs
        if "central" in r["mechanism"]
        and not r["epsilon"] - tolerance <= r["reported_epsilon"] <= r["epsilon"] + 1e-9
    ]


def notes(s: Settings, n: Sizes) -> list[str]:
    """Return the setting and caveats a reader needs to interpret the table."""
    stacked = SeparatedPrivatization(
        s.stacked_direction_epsilon, s.magnitude_epsilon, s.local_clip, s.magnitude_levels
    )
    return [
        f"Digits, IID over N = {s.num_clients} clients ({n.train_examples} train examples, "
        f"~{n.train_examples / s.num_clients:.1f} each), logistic regression (d = {n.dim}); "
        f"FedAvg, C̄ = {s.cohort} clients per round (q = {s.sample_rate:g}), {s.rounds} rounds, "
        f"1 local epoch at lr {s.lr:g}; seeds {list(s.seeds)}; final-round test accuracy, "
        "mean ± std over seeds.",
        "Privacy unit: one client's whole data (user-level). Central ε: whole run, at "
        f"δ = {s.delta:g}, RDP accountant, Poisson sampling; the value each run reports (z "
        "calibrated to the sweep's target). LDP ε: per report, ε₁ (PrivUnit2) + ε₂ = "
        f"{s.magnitude_epsilon:g} (ScalarDP, k = {s.magnitude_levels}), r = {s.local_clip:g}; "
        f"the 'x E[reports]' column multiplies it by the {s.expected_reports:g} reports a "
        "client makes on average (basic composition; a client's actual count varies); by "
        "post-processing it also bounds what the released models reveal ('-': no central "
        "mechanism).",
        f"Central DP clips at S = {s.clip_norm:g}. With only C̄ = {s.cohort} clients, the noise "
        "on the mean update (std z S / C̄ per coordinate) has norm about sqrt(d) z S / C̄ = "
        f"{math.sqrt(n.dim) / s.cohort:.2f} z S: at small ε it exceeds any one clipped update. "
        "Deployments average thousands of clients per round.",
        f"Local + central: ε₁ = {s.stacked_direction_epsilon:g}, ε₂ = {s.magnitude_epsilon:g} "
        f"per report, central S = r/m = {stacked_clip(s, n.dim):.2f} (an unbiased S would be "
        f"the largest report norm, {norm_bound(stacked, n.dim):.1f}): at equal central ε its "
        f"noise is {stacked_clip(s, n.dim) / s.clip_norm:.1f}x central DP's, on top of LDP's.",
        "Hyperparameters come from one non-private run and are not tuned per ε.",
    ]


def table_line(r: Row) -> str:
    """Return one markdown row; '-' where a mechanism has no such parameter."""
    central = "∞" if r.mechanism == "none" else "-"
    if r.central_epsilon is not None:
        central = f"{r.central_epsilon:.3f}"
    ldp = (f"{r.ldp_epsilon:g}", f"{r.ldp_epsilon_composed:g}") if r.ldp_epsilon else ("∞", "∞")
    noise = (
        (f"{r.noise_multiplier:.3f}", f"{r.clip_norm:.2f}", f"{r.noise_std_on_mean:.4f}")
        if "central" in r.mechanism
        else ("-", "-", "-")
    )
    accuracy = f"{r.final_accuracy:.3f} ± {r.final_accuracy_std:.3f}"
    return "| " + " | ".join((MECHANISMS[r.mechanism], central, *ldp, *noise, accuracy)) + " |"


def markdown(rows: Sequence[Row], s: Settings, n: Sizes) -> str:
    """Return the notes and the table in markdown."""
    header = [
        f"| mechanism | central ε (δ={s.delta:g}, run) | LDP ε per report | LDP ε x E[reports] "
        "| z | S | noise std on mean | final test accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join([*notes(s, n), "", *header, *map(table_line, rows)]) + "\n"


def plot(rows: Sequence[Row], path: Path) -> None:
    """Plot final test accuracy against ε, one line per mechanism; no DP as a horizontal line."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for mechanism in ("central", "ldp", "ldp+central"):
        mine = [r for r in rows if r.mechanism == mechanism]
        label = MECHANISMS[mechanism]
        if mechanism == "ldp+central":
            label += f" (LDP ε {mine[0].ldp_epsilon:g} per report)"
        x = [r.ldp_epsilon if r.central_epsilon is None else r.central_epsilon for r in mine]
        axis.errorbar(x, [r.final_accuracy for r in mine], [r.final_accuracy_std for r in mine],
                      marker="o", capsize=3, label=label)  # fmt: skip
    for r in (r for r in rows if r.mechanism == "none"):
        axis.axhline(r.final_accuracy, color="black", linestyle="--", label="no DP")
        axis.axhspan(r.final_accuracy - r.final_accuracy_std,
                     r.final_accuracy + r.final_accuracy_std, color="black", alpha=0.1)  # fmt: skip
    axis.set_xscale("log", base=2)
    axis.set(
        xlabel="ε (central: whole run at δ; local DP: ε₁+ε₂ per report)",
        ylabel="final test accuracy",
        title="Privacy-utility on digits (user-level DP)",
    )
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(runs: Sequence[dict[str, Any]], s: Settings, n: Sizes, out: Path) -> None:
    """Write the table (markdown, CSV) and the plot into ``out``; print the table."""
    rows = summarize(runs, s)
    with (out / "table.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    mismatches = epsilon_mismatches(runs)
    check = (
        "Reported central ε outside [target - 0.05, target]: " + "; ".join(mismatches)
        if mismatches
        else "Every central-DP run reported an ε within [target - 0.05, target]."
    )
    table = f"{markdown(rows, s, n)}\n{check}\n"
    (out / "table.md").write_text(table)
    plot(rows, out / "privacy_utility.png")
    print(f"\n{table}")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the sweep, then write the table, the plot and the raw results."""
    parser = argparse.ArgumentParser(description="Privacy-utility trade-off on digits.")
    add_folder_arguments(parser, "privacy_utility")
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 rounds")
    parser.add_argument("--processes", type=int, default=2, help="runs in parallel")
    args = parser.parse_args(argv)
    out = folder_of(args, "privacy_utility")
    refuse_to_replace(parser, args, out)
    start = time.perf_counter()
    settings = QUICK if args.quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    mute_expected_warnings()
    n = sizes(settings, out)
    runs = run_all(build_jobs(settings, n.dim), settings, out, args.processes)
    raw = {"settings": asdict(settings), "sizes": asdict(n), "runs": runs}
    (out / RESULTS_FILE).write_text(json.dumps(raw, indent=1))
    report(runs, settings, n, out)
    elapsed = time.perf_counter() - start
    print(f"elapsed: {elapsed:.1f} s ({elapsed / 60:.1f} min), {args.processes} processes")


if __name__ == "__main__":
    main()
