"""Murata & Suzuki (ICML 2021), Figs. 2 and 4, scaled down to a 2-core CPU.

"Bias-Variance Reduced Local SGD for Less Heterogeneous Federated Learning"
(arXiv 2102.03198) compares BVR-L-SGD with minibatch SGD, SARAH, Local SGD and
SCAFFOLD as the workers' data grow more heterogeneous. We keep the experimental
protocol of the paper and change its scale, so that 5 methods x 5 values
of q x 6 step sizes x 5 seeds x 100 rounds fit in 20 minutes on two cores:

- data: scikit-learn's digits (embedded, 10 classes) and a one-hidden-layer MLP,
  not CIFAR-10 and a CNN;
- heterogeneity: the ``qsplit`` partitioner, our RECONSTRUCTION of the paper's q
  (each worker gets a fraction q of i.i.d. samples, the rest from its own
  label-sorted shard; q = 1 is i.i.d., q = 0 maximally heterogeneous);
- budget B = 64 per worker per round (the paper: 256 to 1024): K = B/16 local
  steps of b = 16 for the local methods, one batch of B for the others; SARAH and
  BVR-L-SGD restart every T = 10 rounds from each worker's full local gradient;
- step size: for each method and q, the η of the paper's grid with the lowest
  validation loss (best over rounds, mean over seeds). The validation set is a
  stratified half of the held-out split and the test set the other half, so the
  reported test numbers played no part in choosing η.

The train loss is the paper's objective f = (1/P) sum_p f_p: each worker's mean
loss on its whole partition, workers weighted equally. The seed controls the
train/held-out split, the partition, the initial model and every draw. Per round
we also keep the loop's traffic: BVR-L-SGD needs two exchanges per round, the
others one, so counting rounds alone flatters it.

``python experiments/bvr_heterogeneity.py`` runs it all into
``runs/bvr_heterogeneity/``; ``--quick`` is a smoke test into
``runs/bvr_heterogeneity-quick/``; ``--replot`` redoes table, figures and verdict
from ``results.json``. A full result is replaced only with ``--overwrite``
(``result_folder.py``).
"""

import argparse
import json
import logging
import multiprocessing
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache, partial
from typing import Any

import matplotlib
import numpy as np
import torch
from bvr_report import report
from bvr_settings import FULL, METHODS, METRICS, QUICK, TRAFFIC, Settings
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from result_folder import RESULTS_FILE, add_folder_arguments, folder_of, refuse_to_replace
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn import functional

from fedsim import keys
from fedsim.clients import TorchTask, make_client_app
from fedsim.data import FederatedData, build_federated_data
from fedsim.engine import InlineGrid
from fedsim.experiment import initial_arrays
from fedsim.loop import RoundReport, run_rounds
from fedsim.models import mlp
from fedsim.strategies import BVRLSGD, SARAH, SCAFFOLD, LocalSGD, MinibatchSGD
from fedsim.strategies.multi_exchange import GradientStrategy

matplotlib.use("Agg")


@dataclass(frozen=True)
class Job:
    """One run: a method at one step size on one seed's q-split."""

    method: str
    q: float
    lr: float
    seed: int


@dataclass(frozen=True)
class Split:
    """A seed's federation plus the validation and test halves of its held-out split."""

    data: FederatedData
    validation: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


@lru_cache(maxsize=8)
def build_split(q: float, seed: int, num_workers: int, test_fraction: float) -> Split:
    """Partition digits with ``qsplit``; halve the held-out split, stratified by label."""
    data = build_federated_data(
        dataset="digits",
        partitioner="qsplit",
        num_clients=num_workers,
        seed=seed,
        q=q,
        test_fraction=test_fraction,
    )
    x, y = data.central.test_x, data.central.test_y
    val, test = train_test_split(
        np.arange(len(y)), test_size=0.5, stratify=y.numpy(), random_state=seed
    )
    return Split(data, (x[val], y[val]), (x[test], y[test]))


def build_strategy(method: str, *, lr: float, seed: int, s: Settings) -> GradientStrategy:
    """Every worker every round; local methods take K steps of b, the others one batch of B."""
    everyone: dict[str, Any] = {
        "seed": seed,
        "fraction_train": 1.0,
        "min_train_nodes": s.num_workers,
        "fraction_evaluate": 0.0,
        "min_evaluate_nodes": 0,
        "min_available_nodes": s.num_workers,
    }
    local = {**everyone, "lr": lr, "batch_size": s.local_batch, "local_steps": s.local_steps}
    whole = {**everyone, "lr": lr, "batch_size": s.budget}
    staged = {"stage_rounds": s.stage_rounds, "reference_batch_size": 0}
    builders: dict[str, Callable[[], GradientStrategy]] = {
        "minibatch-sgd": lambda: MinibatchSGD(**whole),
        "sarah": lambda: SARAH(**whole, **staged),
        "local-sgd": lambda: LocalSGD(**local),
        "scaffold": lambda: SCAFFOLD(**local, server_lr=1.0),
        "bvr-l-sgd": lambda: BVRLSGD(**local, **staged),
    }
    return builders[method]()


def evaluator(model: nn.Module, split: Split) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Return f = (1/P) sum_p f_p on the train partitions, and validation/test loss and accuracy."""
    central, partitions = split.data.central, split.data.partitions
    owner = torch.empty(len(central.train_y), dtype=torch.long)
    for worker, indices in enumerate(partitions):
        owner[torch.from_numpy(indices)] = worker  # qsplit is exhaustive: every sample owned
    sizes = torch.bincount(owner, minlength=len(partitions)).double()

    def evaluate(_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            losses = functional.cross_entropy(
                model(central.train_x), central.train_y, reduction="none"
            )
            per_worker = torch.zeros(len(partitions), dtype=torch.double)
            per_worker.index_add_(0, owner, losses.double())
            metrics = MetricRecord({"train_loss": (per_worker / sizes).mean().item()})
            for name, (x, y) in (("val", split.validation), ("test", split.test)):
                logits = model(x)
                metrics[f"{name}_loss"] = functional.cross_entropy(logits, y).item()
                metrics[f"{name}_accuracy"] = (logits.argmax(1) == y).double().mean().item()
        return metrics

    return evaluate


class History:
    """Observer keeping each round's central metrics and traffic as columns."""

    def __init__(self) -> None:
        self.columns: dict[str, list[float]] = defaultdict(list)

    def on_round(self, report: RoundReport) -> None:
        """Append one round (round 0 is the initial model, with no traffic)."""
        self.columns["round"].append(report.round)
        for name in METRICS:
            self.columns[name].append(report.central.get(name, float("nan")))
        for name in TRAFFIC:
            self.columns[name].append(getattr(report, name))


class Muted(logging.Filter):
    """Drop, and count, the log records that contain ``text``.

    Strategies warn once per skipped reply (non-finite after a divergent step) and
    Flower once per run that ``fraction_evaluate = 0`` (we evaluate centrally on
    purpose): counted, not printed, they leave the progress lines readable.
    """

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.count = text, 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the records that do not match."""
        matched = self.text in record.getMessage()
        self.count += matched
        return not matched


SKIPPED = Muted("Skipping reply")


def init_process() -> None:
    """One torch thread per process (the pool uses the cores); mute expected warnings."""
    torch.set_num_threads(1)
    logging.getLogger("fedsim.strategies.fedavg").addFilter(SKIPPED)
    logging.getLogger("flwr").addFilter(Muted("Federated evaluation will be skipped"))


def run_job(job: Job, s: Settings) -> dict[str, Any]:
    """Run one job on the inline engine; return its settings, per-round columns and cost."""
    start, skipped_before = time.perf_counter(), SKIPPED.count
    split = build_split(job.q, job.seed, s.num_workers, s.test_fraction)
    data = split.data
    task = TorchTask(
        model_fn=partial(mlp, data.central.input_shape, data.central.num_classes, hidden=s.hidden),
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=lambda partition, _count: data.client_dataset(partition),
    )
    history = History()
    strategy = build_strategy(job.method, lr=job.lr, seed=job.seed, s=s)
    run_rounds(
        strategy=strategy,
        grid=InlineGrid(
            make_client_app(task, algorithms=[type(strategy)]), num_nodes=s.num_workers
        ),
        initial_arrays=initial_arrays(task, job.seed),
        num_rounds=s.rounds,
        train_config=ConfigRecord({keys.SEED: job.seed}),
        evaluate_fn=evaluator(task.model_fn(), split),
        eval_every=1,
        observers=[history],
    )
    return {
        **asdict(job),
        **history.columns,
        "skipped_replies": SKIPPED.count - skipped_before,
        "seconds": time.perf_counter() - start,
    }


def run_all(s: Settings, processes: int) -> list[dict[str, Any]]:
    """Run every (q, method, η, seed) on a process pool, printing a line per finished run."""
    jobs = [Job(m, q, lr, seed) for q in s.qs for m in METHODS for lr in s.lrs for seed in s.seeds]
    runs = []
    # spawn, not fork: the children start without the parent's torch threads.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=init_process) as pool:
        futures = [pool.submit(run_job, job, s) for job in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            run = future.result()
            runs.append(run)
            print(
                f"[{done}/{len(jobs)}] {METHODS[run['method']]:13} q={run['q']:.2f} "
                f"eta={run['lr']:<5} seed={run['seed']}: best f {np.nanmin(run['train_loss']):.4f}"
                f", best val acc {np.nanmax(run['val_accuracy']):.3f}, skipped replies "
                f"{run['skipped_replies']}, {run['seconds']:.1f} s",
                flush=True,
            )
    return sorted(
        runs, key=lambda r: (r["q"], list(METHODS).index(r["method"]), r["lr"], r["seed"])
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the sweep (or reload it with ``--replot``), then report it."""
    parser = argparse.ArgumentParser(description="Murata & Suzuki (ICML 2021), Figs. 2 and 4.")
    add_folder_arguments(parser, "bvr_heterogeneity")
    parser.add_argument("--quick", action="store_true", help="2 q, 2 η, 1 seed, 5 rounds")
    parser.add_argument("--processes", type=int, default=2, help="runs in parallel")
    parser.add_argument("--replot", action="store_true", help="report OUT/results.json again")
    args = parser.parse_args(argv)
    out = folder_of(args, "bvr_heterogeneity")
    if not args.replot:  # redrawing a result's table and figures replaces no result
        refuse_to_replace(parser, args, out)
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_FILE
    if args.replot:
        saved = json.loads(results.read_text())
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in saved["settings"].items()
        }
        settings = Settings(**values)
        runs = saved["runs"]
    else:
        settings = QUICK if args.quick else FULL
        runs = run_all(settings, args.processes)
        elapsed = time.perf_counter() - start
        results.write_text(
            json.dumps({"settings": asdict(settings), "elapsed_s": elapsed, "runs": runs})
        )
    report(runs, settings, out)
    elapsed = time.perf_counter() - start
    ran = "" if args.replot else f", {args.processes} processes"
    print(f"elapsed: {elapsed:.1f} s ({elapsed / 60:.1f} min){ran}")


if __name__ == "__main__":
    main()
