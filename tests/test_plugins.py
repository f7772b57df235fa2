"""Models and datasets by import path, with their params checked before any work.

(Strategies by import path: ``test_custom_strategy_guide.py`` runs the guide's FedProx.)
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedsim.config import ConfigError, parse_config

PLUGIN = textwrap.dedent(
    '''
    """A user's model and dataset, outside fedsim."""

    import torch
    from torch import nn

    from fedsim.data.datasets import CentralDataset


    def wide_mlp(input_shape: tuple, num_classes: int, *, width: int = 8) -> nn.Module:
        hidden = nn.Linear(4, width)
        return nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), nn.Linear(width, num_classes))


    def blobs(*, samples: int, seed: int, test_fraction: float) -> CentralDataset:
        generator = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 3, (samples,), generator=generator)
        x = torch.randn(samples, 4, generator=generator) + 3 * y[:, None].float()
        cut = int(samples * (1 - test_fraction))
        return CentralDataset(x[:cut], y[:cut], x[cut:], y[cut:], num_classes=3)


    def not_a_dataset(*, seed: int) -> list:
        return []
    '''
)
CONFIG = textwrap.dedent(
    """
    name = "plugins"
    rounds = 2
    progress = false
    plot = false

    [data]
    dataset = "my_plugins:blobs"
    partitioner = "iid"
    num_clients = 6

    [data.params]
    samples = 300

    [model]
    name = "my_plugins:wide_mlp"

    [model.params]
    width = 16

    [strategy]
    clients_per_round = 3
    """
)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "my_plugins.py").write_text(PLUGIN)
    (tmp_path / "run.toml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)  # parse_config finds modules in the current directory
    return tmp_path


def _run(folder: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", "run.toml", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_model_and_a_dataset_by_import_path_train(folder: Path) -> None:
    done = _run(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((folder / "runs" / "plugins" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["accuracy"] > 1 / 3  # better than chance
    model = __import__("torch").load(folder / "runs" / "plugins" / "model.pt")
    assert model["1.weight"].shape == (16, 4)  # [model.params] width reached the factory


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"model": {"params": {"widht": 3}}}, "unknown parameter 'model.params.widht'"),
        ({"model": {"params": {"width": "wide"}}}, "model.params.width = 'wide' must be"),
        ({"data": {"params": {}}}, "data.params.samples is required"),
        ({"data": {"params": {"samples": 9, "seed": 1}}}, "fedsim sets 'seed' itself"),
        # A zoo model's knobs are params too, checked the same way.
        ({"model": {"name": "mlp", "params": {"width": 3}}}, "parameter 'model.params.width'"),
        ({"data": {"dataset": "digit"}}, "did you mean 'digits'"),
    ],
)
def test_a_plugins_params_are_checked_when_the_config_loads(
    folder: Path, override: dict, expected: str
) -> None:
    import tomllib

    raw = tomllib.loads(CONFIG)
    for table, values in override.items():
        raw[table] = {**raw[table], **values}
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        parse_config(raw)


def test_a_dataset_loader_must_return_a_central_dataset(folder: Path) -> None:
    done = _run(folder, "data.dataset=my_plugins:not_a_dataset", "data.params={}")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "must return a fedsim.data.datasets.CentralDataset" in done.stderr
