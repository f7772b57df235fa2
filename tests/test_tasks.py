"""The task decides the loss and the metrics: classification, regression, next character."""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedsim.clients.training import evaluate
from fedsim.config import ConfigError, parse_config
from fedsim.data.datasets import CentralDataset
from fedsim.data.federated import build_federated_data, partitioned
from fedsim.data.text import VOCABULARY, WINDOW, encode, load_pydocs, topics, windows
from fedsim.results import plotted_metrics
from fedsim.runner import run_experiment

CPU = torch.device("cpu")


# --- The pydocs next-character dataset -------------------------------------------------


def test_pydocs_gives_each_topic_to_one_client_and_every_window_to_one_split() -> None:
    central, natural = load_pydocs(num_clients=len(topics()))
    assert central.task == "next-token" and central.num_classes == len(VOCABULARY) + 1
    assert central.input_shape == (WINDOW,) and central.train_x.dtype == torch.int64
    indices = np.concatenate(natural)
    assert np.array_equal(np.sort(indices), np.arange(len(central.train_y)))  # disjoint, whole
    # Topic by topic, in name order: the first topic's train windows are its text's start.
    first = encode(next(iter(topics().values())))
    train = len(natural[0])
    assert torch.equal(
        central.train_x[natural[0]].flatten(), torch.from_numpy(first[: train * WINDOW])
    )


def test_a_window_is_followed_by_its_target_and_unknown_characters_are_zero() -> None:
    ids = encode("abcdefg\u00e9")  # é is outside string.printable
    assert ids[-1] == 0 and ids[0] == VOCABULARY.index("a") + 1
    inputs, targets = windows(ids, window=3)
    assert inputs.tolist() == [ids[0:3].tolist(), ids[3:6].tolist()]
    assert targets.tolist() == [ids[3], ids[6]]


def test_fewer_clients_than_topics_deal_the_topics_round_robin() -> None:
    central, natural = load_pydocs(num_clients=5)
    assert len(natural) == 5 and sum(map(len, natural)) == len(central.train_y)
    with pytest.raises(ValueError, match=r"data.num_clients = 500: the 'pydocs' dataset has"):
        load_pydocs(num_clients=500)


# --- Evaluation per task ---------------------------------------------------------------


def test_regression_reports_the_mean_squared_error_per_target() -> None:
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [2.0]]))
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.zeros(3, 2)  # outputs (1,2), (2,4), (3,6): squared errors 5, 20, 45 over 2 targets
    metrics = evaluate(
        model, TensorDataset(x, y), loss_fn=nn.L1Loss(), batch_size=2, device=CPU, task="regression"
    )
    assert metrics["mse"] == pytest.approx((5 + 20 + 45) / 2 / 3)
    assert metrics["loss"] == pytest.approx((3 + 6 + 9) / 2 / 3)  # the loss is the task's own
    assert "accuracy" not in metrics


def test_next_token_reports_accuracy_and_the_perplexity_of_the_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    model = nn.Embedding.from_pretrained(logits)  # token i -> logits[i]
    tokens, targets = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2])
    metrics = evaluate(
        model,
        TensorDataset(tokens, targets),
        loss_fn=nn.CrossEntropyLoss(),
        batch_size=2,
        device=CPU,
        task="next-token",
    )
    cross_entropy = nn.functional.cross_entropy(logits, targets).item()
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["perplexity"] == pytest.approx(math.exp(cross_entropy), rel=1e-6)


def test_classification_of_real_valued_targets_says_which_task_to_use() -> None:
    data = TensorDataset(torch.ones(4, 3), torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"for real-valued targets use task 'regression'"):
        evaluate(nn.Linear(3, 1), data, loss_fn=nn.MSELoss(), batch_size=4, device=CPU)


def test_a_central_dataset_checks_its_targets_against_its_task() -> None:
    x, labels = torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"regression task must be float32 of shape \(n, "):
        CentralDataset(x, labels, x, labels, num_classes=1, task="regression")
    with pytest.raises(ValueError, match=r"task must be one of"):
        CentralDataset(x, labels, x, labels, num_classes=2, task="ranking")  # type: ignore[arg-type]


def test_a_regression_dataset_is_split_iid_or_by_its_own_clients_only() -> None:
    x, y = torch.zeros(8, 2), torch.zeros(8, 1)
    central = CentralDataset(x, y, x, y, num_classes=1, task="regression")
    assert partitioned(central, partitioner="iid", num_clients=2, seed=0).num_partitions == 2
    with pytest.raises(ValueError, match=r"'dirichlet' splits by class label"):
        partitioned(central, partitioner="dirichlet", num_clients=2, seed=0)


# --- From a config ---------------------------------------------------------------------


def regression_config(folder: Path, **client: Any) -> dict[str, Any]:
    return {
        "name": "least-squares",
        "rounds": 3,
        "progress": False,
        "output_dir": str(folder),
        "data": {"dataset": "least-squares", "partitioner": "natural", "num_clients": 6},
        "model": {"name": "logreg"},
        "client": {"lr": 0.1, **client},
        "strategy": {"clients_per_round": 3, "evaluate_clients": 2},
    }


def rows(config: Any) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def test_least_squares_trains_with_mse_by_default_and_reports_it(tmp_path: Path) -> None:
    config = parse_config(regression_config(tmp_path))
    summary = run_experiment(config)
    history = rows(config)
    for row in history:  # mse is the loss, summed in another order
        assert row["central_mse"] == pytest.approx(row["central_loss"], rel=1e-6)
    assert history[-1]["central_mse"] < history[0]["central_mse"]  # it learns
    assert summary["mse"] == history[-1]["central_mse"] and summary["accuracy"] is None
    assert "evaluate_mse" in history[-1]
    assert (config.run_dir / "metrics.png").exists()


def test_a_loss_by_import_path_trains_and_the_metric_stays_the_tasks(tmp_path: Path) -> None:
    config = parse_config(regression_config(tmp_path, loss="fedsim.data.least_squares:half_mse"))
    run_experiment(config)
    last = rows(config)[-1]
    assert last["central_loss"] == pytest.approx(last["central_mse"] / 2, rel=1e-6)


def test_the_loss_is_checked_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"client.loss = 'mae' is not one of .*'mse'"):
        parse_config(regression_config(tmp_path, loss="mae"))
    with pytest.raises(ConfigError, match=r"client.loss: cannot import 'no_such_module'"):
        parse_config(regression_config(tmp_path, loss="no_such_module:loss"))
    config = parse_config(regression_config(tmp_path, loss="cross-entropy"))
    with pytest.raises(ConfigError, match=r"'cross-entropy' needs class labels; .* regression"):
        run_experiment(config)
    assert not config.run_dir.exists()  # refused before any work


def test_the_datasets_own_clients_go_with_natural_only_where_they_exist() -> None:
    with pytest.raises(ConfigError, match=r"the 'least-squares' dataset is split by client"):
        parse_config({"data": {"dataset": "least-squares", "partitioner": "iid"}})
    with pytest.raises(ConfigError, match=r"'natural' applies to datasets split by their own"):
        parse_config({"data": {"dataset": "digits", "partitioner": "natural"}})
    pooled = build_federated_data(dataset="pydocs", partitioner="iid", num_clients=3, seed=0)
    assert pooled.central.task == "next-token" and pooled.num_partitions == 3


def test_the_plot_shows_the_tasks_metric_beside_the_loss() -> None:
    assert plotted_metrics({"central_accuracy", "central_loss"}) == ("accuracy", "loss")
    assert plotted_metrics({"central_mse", "central_loss"}) == ("mse", "loss")
    lm = {"central_accuracy", "central_perplexity", "central_loss"}
    assert plotted_metrics(lm) == ("perplexity", "loss")
    assert plotted_metrics({"central_fid", "privacy_epsilon"}) == ("fid", "epsilon")
