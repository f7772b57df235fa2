"""The model zoo: every entry trains federated from a config, wrapped like any model.

Each zoo model runs two FedAvg rounds on the inline engine, on data generated in its
input shape by a dataset loader given by import path: the path a user's own model and
data take, with no special case. Knobs that only set a size are turned down where the
paper's size would cost seconds; the paper's sizes are checked by parameter count.
"""

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsim.config import ConfigError, parse_config
from fedsim.experiment import build_task, initial_arrays
from fedsim.models.char_lstm import char_lstm
from fedsim.models.fedavg import cifar_cnn, fedavg_2nn, fedavg_cnn
from fedsim.models.resnet import resnet18_gn
from fedsim.models.transformer import transformer
from fedsim.registry import MODELS, resolve
from fedsim.runner import run_experiment

GENERATED = textwrap.dedent(
    '''
    """Random inputs of a given shape with labels a linear rule draws from them."""

    import torch

    from fedsim.data.datasets import CentralDataset


    def generated(*, shape: list, classes: int, tokens: bool = False, seed: int) -> CentralDataset:
        g = torch.Generator().manual_seed(seed)
        n = 24
        if tokens:  # character ids, the next one drawn from the last
            x = torch.randint(0, classes, (n, *shape), generator=g)
            y = (x[:, -1] + 1) % classes
        else:
            x = torch.randn(n, *shape, generator=g)
            y = (x.flatten(1)[:, 0] > 0).long() + 2 * (x.flatten(1)[:, -1] > 0).long()
        task = "next-token" if tokens else "classification"
        return CentralDataset(x[:20], y[:20], x[20:], y[20:], num_classes=classes, task=task)
    '''
)

#: name -> (input shape, classes, token inputs, model params for the test)
ZOO: dict[str, tuple[list[int], int, bool, dict[str, Any]]] = {
    "cnn": ([1, 8, 8], 4, False, {}),
    "mlp": ([1, 8, 8], 4, False, {}),
    "logreg": ([1, 8, 8], 4, False, {}),
    "fedavg-cnn": ([1, 28, 28], 10, False, {}),
    "fedavg-2nn": ([1, 28, 28], 10, False, {}),
    "cifar-cnn": ([3, 32, 32], 10, False, {}),
    "char-lstm": ([80], 101, True, {"hidden": 64}),
    "resnet18-gn": ([3, 32, 32], 10, False, {"width": 8}),
    "transformer": ([1, 8, 8], 4, False, {}),
}


def zoo_config(name: str, folder: Path) -> dict[str, Any]:
    shape, classes, tokens, params = ZOO[name]
    return {
        "name": name,
        "rounds": 2,
        "progress": False,
        "plot": False,
        "output_dir": str(folder / "runs"),
        "data": {
            "dataset": "zoo_generated:generated",
            "partitioner": "iid",
            "num_clients": 2,
            "params": {"shape": shape, "classes": classes, "tokens": tokens},
        },
        "model": {"name": name, "params": params},
        "client": {"lr": 0.05, "batch_size": 10},
        "strategy": {"clients_per_round": 2, "evaluate_clients": 1},
    }


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "zoo_generated.py").write_text(GENERATED)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_shipped_model_is_tested_here() -> None:
    assert set(ZOO) == set(MODELS)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_each_zoo_model_trains_two_federated_rounds(name: str, folder: Path) -> None:
    config = parse_config(zoo_config(name, folder))
    summary = run_experiment(config)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    rows = [
        json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert math.isfinite(row["train_train_loss"]) and row["failures"] == 0
        assert 0 <= row["central_accuracy"] <= 1 and math.isfinite(row["central_loss"])
        assert 0 <= row["evaluate_accuracy"] <= 1  # the clients evaluated it too
    first = initial_arrays(build_task(config), config.seed).to_torch_state_dict()
    trained = torch.load(config.run_dir / "model.pt")
    assert first.keys() == trained.keys()
    assert any(not torch.equal(first[k], trained[k]) for k in first)


def test_the_next_character_model_reports_perplexity(folder: Path) -> None:
    config = parse_config(zoo_config("char-lstm", folder))
    summary = run_experiment(config)
    last = json.loads((config.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["central_perplexity"] == pytest.approx(math.exp(last["central_loss"]), rel=1e-5)
    assert summary["perplexity"] == last["central_perplexity"]


@pytest.mark.parametrize(
    ("factory", "shape", "classes", "parameters"),
    [
        # The FedAvg paper's counts, Section 3: 199,210 and 1,663,370.
        (fedavg_2nn, (1, 28, 28), 10, 199_210),
        (fedavg_cnn, (1, 28, 28), 10, 1_663_370),
        # The TensorFlow CIFAR-10 tutorial model: 2 x (5x5x64 conv), 384, 192, 10.
        (cifar_cnn, (3, 32, 32), 10, 4_864 + 102_464 + 4_096 * 384 + 384 + 73_920 + 1_930),
        # ResNet-18 on CIFAR-10: 11,173,962 parameters (GroupNorm has BatchNorm's affine pair).
        (resnet18_gn, (3, 32, 32), 10, 11_173_962),
    ],
)
def test_paper_models_have_their_papers_parameter_counts(
    factory: Any, shape: tuple[int, ...], classes: int, parameters: int
) -> None:
    model = factory(shape, classes)
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_hold_no_buffers_so_every_strategy_takes_them(name: str) -> None:
    shape, classes, _, params = ZOO[name]
    model = resolve("model.name", name, MODELS)(tuple(shape), classes, **params)
    assert list(model.named_buffers()) == []


def test_a_zoo_model_refuses_an_input_shape_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"model 'char-lstm' needs windows of character ids"):
        char_lstm((1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"patch = 3 must divide the image's 8x8"):
        transformer((1, 8, 8), 10, patch=3)
    with pytest.raises(ValueError, match=r"model 'cifar-cnn' needs image inputs"):
        cifar_cnn((64,), 10)


def test_a_zoo_models_knobs_are_checked_before_any_work(folder: Path) -> None:
    raw = zoo_config("transformer", folder)
    raw["model"]["params"] = {"depht": 3}
    with pytest.raises(ConfigError, match=r"unknown parameter 'model.params.depht' \(did you mean"):
        parse_config(raw)
    raw["model"]["params"] = {"depth": "three"}
    with pytest.raises(ConfigError, match=r"model.params.depth = 'three' must be an integer"):
        parse_config(raw)


def test_the_char_lstm_predicts_from_the_last_character() -> None:
    torch.manual_seed(0)
    model = char_lstm((5,), 7, hidden=4)
    tokens = torch.randint(0, 7, (3, 5))
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 7
    assert model(tokens).shape == (3, 7)
    assert not torch.equal(model(tokens), model(changed))  # the whole window counts


def test_the_gs_wgan_generator_and_discriminator_train_two_rounds(folder: Path) -> None:
    """GS-WGAN's pair: discriminators on the clients, the generator on the server."""
    raw = zoo_config("cnn", folder)
    raw["name"] = "gs-wgan"
    raw["model"] = {"name": "fedsim.models.gs_wgan:small_discriminator"}
    raw["strategy"] = {
        "name": "gs-wgan",
        "clients_per_round": 1,
        "params": {
            "generator": "fedsim.models.gs_wgan:small_generator",
            "batch_size": 8,
            "iterations_per_round": 2,
            "critic_steps": 1,
            "warm_start_steps": 1,
            "evaluate_samples_per_class": 4,
            "evaluate_classifier_epochs": 1,
        },
    }
    config = parse_config(raw)
    summary = run_experiment(config)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert summary["epsilon"] is not None and summary["epsilon"] > 0  # sanitized, accounted
    trained = torch.load(config.run_dir / "model.pt")  # the server's generator and its EMA
    generator = resolve("g", "fedsim.models.gs_wgan:small_generator", {})((1, 8, 8), 4)
    saved = {k.removeprefix("generator.") for k in trained if k.startswith("generator.")}
    assert saved == set(generator.state_dict())
