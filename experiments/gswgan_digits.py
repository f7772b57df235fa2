"""Federated DP-GS-WGAN on the embedded 8x8 digits: samples, downstream accuracy and distance per ε.

GS-WGAN (Chen, Orekondy & Fritz, NeurIPS 2020) releases only a generator, trained
on the server from the sanitized image gradients of discriminators that live on
the clients (``fedsim.strategies.gs_wgan``). This script trains
``experiments/configs/gswgan-digits.toml`` (24 clients, B = 32, 3,000 iterations)
at several noise multipliers σ, σ = 0 being the ε = ∞ run (clipping only), and
measures each EMA generator's samples as the paper does:

- **downstream accuracy**: a classifier trained only on 300 generated samples per
  class (the paper's SGD: lr 0.02, momentum 0.9, weight decay 1e-4, batch 128,
  50 epochs), tested on the real test split; beside it, the same classifier
  trained on the real train split;
- **Fréchet distance** between generated and real test images in the features of
  that real-data classifier (not Inception's: not comparable with published FIDs);
- a PNG grid of samples per class.

Each run reports both ε (``fedsim.privacy.gs_wgan_accounting``): the joint
accounting, which is the guarantee, and the paper's. A digits federation has
only 24 clients (q = 1/24), so a meaningful ε needs large σ; the numbers are
reported whatever they reach.

``python experiments/gswgan_digits.py`` writes ``runs/gswgan_digits/``: one run
folder per σ, ``samples-sigma-*.png``, ``results.json``, ``table.md``, ``table.csv``
and ``accuracy_vs_epsilon.png`` (2 CPU cores: about 12 minutes). ``--quick`` is a
smoke test into ``runs/gswgan_digits-quick/``.
"""

import argparse
import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import torch
from flwr.app import ArrayRecord
from result_folder import RESULTS_FILE, add_folder_arguments, folder_of, refuse_to_replace
from torch import nn

from fedsim.config import load_config
from fedsim.experiment import build_strategy, federated_data
from fedsim.generative_eval import sample_quality, save_sample_grid
from fedsim.runner import run_experiment
from fedsim.strategies.gs_wgan import GSWGAN

NAME = "gswgan_digits"
CONFIG = Path(__file__).resolve().parent / "configs" / "gswgan-digits.toml"
FULL = {"sigmas": (0.0, 2.0, 5.0), "overrides": (), "samples_per_class": 300, "epochs": 50}
QUICK = {
    "sigmas": (0.0, 5.0),
    "overrides": (
        "rounds=2", "strategy.params.iterations_per_round=10", "strategy.params.warm_start_steps=1",
        "strategy.params.evaluate_samples_per_class=0", "data.num_clients=6",
    ),
    "samples_per_class": 20,
    "epochs": 2,
}  # fmt: skip


def run_sigma(sigma: float, out: Path, overrides: Sequence[str]) -> tuple[dict[str, Any], Path]:
    """Train the federation at noise multiplier ``sigma``; return its summary and folder."""
    config = load_config(
        CONFIG,
        [
            f"name=sigma-{sigma:g}",
            f"output_dir={out}",
            f"strategy.params.noise_multiplier={sigma}",
            "plot=false",
            *overrides,
        ],
    )
    summary = run_experiment(config, overwrite=True)
    return summary, config.run_dir


def evaluate(
    run_dir: Path,
    sigma: float,
    overrides: Sequence[str],
    *,
    samples_per_class: int,
    epochs: int,
    reference: nn.Module | None,
    out: Path,
    epsilons: tuple[float, float],
) -> tuple[dict[str, Any], nn.Module]:
    """Measure the run's EMA generator; save its sample grid; return the row and the reference."""
    config = load_config(CONFIG, [f"strategy.params.noise_multiplier={sigma}", *overrides])
    strategy = build_strategy(config)
    assert isinstance(strategy, GSWGAN)
    central = federated_data(config.data, config.seed).central
    labels = torch.arange(central.num_classes).repeat_interleave(samples_per_class)
    samples = strategy.sample(ArrayRecord(torch.load(run_dir / "model.pt")), labels)
    quality, reference = sample_quality(
        samples, labels, central.train_x, central.train_y, central.test_x, central.test_y,
        central.num_classes, epochs=epochs, seed=config.seed, reference=reference,
    )  # fmt: skip
    joint, paper = epsilons
    save_sample_grid(
        samples,
        labels,
        out / f"samples-sigma-{sigma:g}.png",
        title=f"σ = {sigma:g}: ε = {_eps(joint)} (paper's accounting {_eps(paper)}), δ = 1e-5",
    )
    row = {
        "sigma": sigma,
        "epsilon_joint": joint,
        "epsilon_paper": paper,
        "downstream_accuracy": quality.downstream_accuracy,
        "real_accuracy": quality.real_accuracy,
        "frechet_distance": quality.frechet_distance,
    }
    return row, reference


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3g}"


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    """Write ``table.md`` and ``table.csv``, one row per σ plus the real-data ceiling."""
    with (out / "table.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| σ | ε (joint: the guarantee) | ε (paper's accounting) | downstream accuracy "
        "| Fréchet distance (real-data classifier's features) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sigma']:g} | {_eps(row['epsilon_joint'])} | {_eps(row['epsilon_paper'])} "
            f"| {row['downstream_accuracy']:.3f} | {row['frechet_distance']:.2f} |"
        )
    lines.append(f"| real data | - | - | {rows[0]['real_accuracy']:.3f} | 0 |")
    (out / "table.md").write_text(
        "Federated GS-WGAN on 8x8 digits (δ = 1e-5). Downstream accuracy: a classifier "
        "trained only on generated samples, tested on the real test split.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def plot_curve(rows: list[dict[str, Any]], out: Path) -> None:
    """Plot downstream accuracy against both ε (ε = ∞ drawn as a horizontal line)."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [r for r in rows if not math.isinf(r["epsilon_joint"])]
    for key, label, marker in (
        ("epsilon_joint", "ε, joint accounting (the guarantee)", "o"),
        ("epsilon_paper", "ε, paper's accounting", "s"),
    ):
        points = sorted((r[key], r["downstream_accuracy"]) for r in finite)
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=label)
    for row in rows:
        if math.isinf(row["epsilon_joint"]):
            ax.axhline(row["downstream_accuracy"], color="grey", ls="--", label="ε = ∞ (σ = 0)")
    ax.axhline(rows[0]["real_accuracy"], color="black", ls=":", label="trained on real data")
    ax.set_xscale("log")
    ax.set_xlabel("ε at δ = 1e-5")
    ax.set_ylabel("downstream accuracy (real test split)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("GS-WGAN on digits: accuracy of a classifier trained on samples")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_epsilon.png", dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Train at every σ, evaluate, and write the tables and figures."""
    parser = argparse.ArgumentParser(description="Federated DP-GS-WGAN on digits.")
    parser.add_argument("--quick", action="store_true", help="2 σ, 20 iterations: a smoke test")
    add_folder_arguments(parser, NAME)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    out = folder_of(args, NAME)
    refuse_to_replace(parser, args, out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, reference = [], None
    for sigma in settings["sigmas"]:
        summary, run_dir = run_sigma(sigma, out, settings["overrides"])
        row, reference = evaluate(
            run_dir, sigma, settings["overrides"],
            samples_per_class=settings["samples_per_class"], epochs=settings["epochs"],
            reference=reference, out=out,
            epsilons=(summary["epsilon"], summary["epsilon_paper"]),
        )  # fmt: skip
        row["train_s"] = summary["wall_time_s"]
        rows.append(row)
        print(
            f"σ = {sigma:g}: ε = {_eps(row['epsilon_joint'])} (paper {_eps(row['epsilon_paper'])}),"
            f" downstream accuracy {row['downstream_accuracy']:.3f},"
            f" Fréchet distance {row['frechet_distance']:.2f}",
            flush=True,
        )
    write_tables(rows, out)
    plot_curve(rows, out)
    result = {"rows": rows, "quick": args.quick, "total_s": time.perf_counter() - started}
    (out / RESULTS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    print((out / "table.md").read_text())
    print(f"wrote {out}/ in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
