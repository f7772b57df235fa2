"""Tables, figures (the paper's Figs. 2 and 4) and verdicts of ``bvr_heterogeneity.py``.

Works on the saved per-run results alone, so ``--replot`` redoes everything
without training again.
"""

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from bvr_settings import LOCAL_METHODS, METHODS, TRAFFIC, Settings

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)


@dataclass(frozen=True)
class Row:
    """One method at one q, at its chosen η; means and (population) stds over seeds."""

    method: str
    q: float
    lr: float
    val_loss: float
    train_loss: float
    train_loss_std: float
    test_accuracy: float
    test_accuracy_std: float
    final_test_accuracy: float
    final_test_accuracy_std: float
    exchanges: float
    uplink_floats: float
    downlink_floats: float


def _finite_or(value: float, default: float) -> float:
    return value if np.isfinite(value) else default


def choose(runs: Sequence[dict[str, Any]], s: Settings) -> list[Row]:
    """Pick η per method and q by validation loss; summarize the chosen runs over seeds."""
    grouped: dict[tuple[str, float, float], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[run["method"], run["q"], run["lr"]].append(run)
    rows = []
    for q in s.qs:
        for method in METHODS:
            scores = {
                lr: _finite_or(float(np.mean([np.nanmin(r["val_loss"]) for r in group])), np.inf)
                for lr in s.lrs
                if (group := grouped[method, q, lr])
            }
            lr = min(scores, key=lambda k: scores[k])  # ties: the smaller η
            rows.append(_row(method, q, lr, scores[lr], grouped[method, q, lr]))
    return rows


def _row(method: str, q: float, lr: float, score: float, group: list[dict[str, Any]]) -> Row:
    best_loss = [np.nanmin(r["train_loss"]) for r in group]
    best_acc = [np.nanmax(r["test_accuracy"]) for r in group]
    final_acc = [r["test_accuracy"][-1] for r in group]
    return Row(
        method=method,
        q=q,
        lr=lr,
        val_loss=score,
        train_loss=float(np.mean(best_loss)),
        train_loss_std=float(np.std(best_loss)),
        test_accuracy=float(np.mean(best_acc)),
        test_accuracy_std=float(np.std(best_acc)),
        final_test_accuracy=float(np.mean(final_acc)),
        final_test_accuracy_std=float(np.std(final_acc)),
        **{name: float(np.mean([sum(r[name]) for r in group])) for name in TRAFFIC},
    )


def markdown(rows: Sequence[Row], s: Settings) -> str:
    """Return the table with the notes a reader needs to interpret it."""
    lines = [
        f"Digits, P = {s.num_workers} workers split by the qsplit RECONSTRUCTION of the paper's "
        f"q (q = 1: i.i.d.); MLP ({s.hidden} hidden); B = {s.budget} (local methods: K = "
        f"{s.local_steps}, b = {s.local_batch}; others: b = B); T = {s.stage_rounds}, full local "
        f"gradient at stage starts; {s.rounds} rounds; seeds {list(s.seeds)}, mean ± std.",
        "η: lowest validation loss (best over rounds, mean over seeds) of "
        f"{list(s.lrs)}. Train loss: f = (1/P) Σ_p f_p, best over rounds. Test accuracy: "
        "best over rounds, and at the last round. Traffic: totals per run, in floats.",
        "",
        "| method | q | η | best train loss f | best test acc | final test acc "
        "| exchanges | uplink floats | downlink floats |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {METHODS[r.method]} | {r.q:g} | {r.lr:g} "
            f"| {r.train_loss:.4f} ± {r.train_loss_std:.4f} "
            f"| {r.test_accuracy:.3f} ± {r.test_accuracy_std:.3f} "
            f"| {r.final_test_accuracy:.3f} ± {r.final_test_accuracy_std:.3f} "
            f"| {r.exchanges:.0f} | {r.uplink_floats:.3g} | {r.downlink_floats:.3g} |"
        )
    return "\n".join(lines) + "\n"


def runs_of(
    runs: Sequence[dict[str, Any]], method: str, q: float, lr: float
) -> list[dict[str, Any]]:
    """Return the runs (one per seed) of one method at one q and one η."""
    return [r for r in runs if (r["method"], r["q"], r["lr"]) == (method, q, lr)]


def chosen_curves(runs: Sequence[dict[str, Any]], row: Row, name: str) -> np.ndarray:
    """Return one column at the row's chosen η, shape (seeds, rounds + 1)."""
    return np.array([r[name] for r in runs_of(runs, row.method, row.q, row.lr)], dtype=float)


def plot_vs_q(rows: Sequence[Row], path: Path) -> None:
    """Fig. 2: best train loss and best test accuracy against q, one line per method."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, label in METHODS.items():
        mine = [r for r in rows if r.method == method]
        qs = [r.q for r in mine]
        axes[0].errorbar(qs, [r.train_loss for r in mine], [r.train_loss_std for r in mine],
                         marker="o", capsize=3, label=label)  # fmt: skip
        axes[1].errorbar(qs, [r.test_accuracy for r in mine], [r.test_accuracy_std for r in mine],
                         marker="o", capsize=3, label=label)  # fmt: skip
    for axis, title in zip(axes, ("best train loss f", "best test accuracy"), strict=True):
        axis.set(xlabel="q (qsplit reconstruction; small q = heterogeneous)", title=title)
        axis.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_rounds(runs: Sequence[dict[str, Any]], rows: Sequence[Row], path: Path) -> None:
    """Fig. 4: train loss and test accuracy against rounds, one column per q, at chosen η.

    Lines are means over seeds, bands the range over seeds.
    """
    qs = sorted({r.q for r in rows})
    figure, axes = plt.subplots(2, len(qs), figsize=(3.6 * len(qs), 6.5), squeeze=False)
    for column, q in enumerate(qs):
        for row in (r for r in rows if r.q == q):
            for line, name in enumerate(("train_loss", "test_accuracy")):
                values = chosen_curves(runs, row, name)
                axis, rounds = axes[line, column], np.arange(values.shape[1])
                axis.plot(rounds, values.mean(0), label=f"{METHODS[row.method]} (η={row.lr:g})")
                # min to max over seeds: unlike mean ± std, it stays positive on a log axis
                axis.fill_between(rounds, values.min(0), values.max(0), alpha=0.2)
        axes[0, column].set(title=f"q = {q:g}", yscale="log")
        axes[1, column].set(xlabel="communication rounds")
        axes[0, column].legend(fontsize=7)
    axes[0, 0].set_ylabel("train loss f")
    axes[1, 0].set_ylabel("test accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def verdicts(runs: Sequence[dict[str, Any]], rows: Sequence[Row]) -> list[str]:
    """State each of the paper's claims next to the numbers measured for it."""
    by = {(r.method, r.q): r for r in rows}
    low, high = min(r.q for r in rows), max(r.q for r in rows)
    lines = [f"Claim 1: local methods degrade as heterogeneity grows (q = {high:g} -> {low:g})."]
    for method in LOCAL_METHODS:
        a, b = by[method, high], by[method, low]
        lines.append(
            f"  {METHODS[method]}: best train loss {a.train_loss:.4f} -> {b.train_loss:.4f} "
            f"({b.train_loss - a.train_loss:+.4f}); best test acc {a.test_accuracy:.3f} -> "
            f"{b.test_accuracy:.3f} ({b.test_accuracy - a.test_accuracy:+.3f})"
        )
    rise = {m: by[m, low].train_loss - by[m, high].train_loss for m in ("bvr-l-sgd", "local-sgd")}
    smaller = "BVR-L-SGD" if rise["bvr-l-sgd"] < rise["local-sgd"] else "Local SGD"
    lines += [
        "Claim 2: BVR-L-SGD degrades much less than Local SGD.",
        f"  rise in best train loss from q = {high:g} to {low:g}: BVR-L-SGD "
        f"{rise['bvr-l-sgd']:+.4f} vs Local SGD {rise['local-sgd']:+.4f} (smaller: {smaller})",
        "  the same rise at each η, untuned (BVR-L-SGD / Local SGD): "
        + ", ".join(_rise_at(runs, lr, low, high) for lr in sorted({r["lr"] for r in runs})),
    ]
    return lines + _rounds_verdict(runs, [r for r in rows if r.q == high])


def _rise_at(runs: Sequence[dict[str, Any]], lr: float, low: float, high: float) -> str:
    """BVR-L-SGD's and Local SGD's rise in seed-mean best train loss from q = high to low.

    The tuned comparison mixes two effects: how a method degrades and which η it
    gets; at a fixed η only the first is left.
    """

    def best(method: str, q: float) -> float:
        return float(np.mean([np.nanmin(r["train_loss"]) for r in runs_of(runs, method, q, lr)]))

    bvr, local = (best(m, low) - best(m, high) for m in ("bvr-l-sgd", "local-sgd"))
    return f"η={lr:g}: {bvr:+.3f} / {local:+.3f}"


def _rounds_verdict(runs: Sequence[dict[str, Any]], rows: Sequence[Row]) -> list[str]:
    """Claim 3 at the largest q: best loss, and rounds to a loss that every method reaches."""
    q = rows[0].q
    curves = {r.method: chosen_curves(runs, r, "train_loss").mean(0) for r in rows}
    exchanges = {r.method: np.cumsum(chosen_curves(runs, r, "exchanges").mean(0)) for r in rows}
    target = max(float(np.nanmin(c)) for c in curves.values())
    ranked = sorted(rows, key=lambda r: r.train_loss)
    lines = [
        f"Claim 3: BVR-L-SGD beats the others in communication rounds at small heterogeneity "
        f"(q = {q:g}).",
        "  best train loss within the rounds run: "
        + ", ".join(f"{METHODS[r.method]} {r.train_loss:.4f}" for r in ranked)
        + f" (lowest: {METHODS[ranked[0].method]})",
        f"  first round whose seed-mean train loss <= {target:.4f} (the highest of the methods' "
        "best seed-mean losses, so every method reaches it), and exchanges until then:",
    ]
    for method, curve in curves.items():
        reached = int(np.argmax(curve <= target))
        lines.append(
            f"    {METHODS[method]}: round {reached}, {exchanges[method][reached]:.0f} exchanges"
        )
    return lines


def report(runs: Sequence[dict[str, Any]], s: Settings, out: Path) -> None:
    """Write table (CSV, markdown), figures and verdict into ``out``; print table and verdict."""
    rows = choose(runs, s)
    with (out / "table.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    table = markdown(rows, s)
    verdict = "\n".join(verdicts(runs, rows)) + "\n"
    (out / "table.md").write_text(table)
    (out / "verdict.txt").write_text(verdict)
    plot_vs_q(rows, out / "fig2_vs_q.png")
    plot_rounds(runs, rows, out / "fig4_vs_rounds.png")
    print(f"\n{table}\n{verdict}")
