"""Config parsing: good configs round-trip; bad ones get one line naming the key."""

from pathlib import Path

import pytest

from fedsim.cli import EXIT_BAD_INPUT, main
from fedsim.config import ConfigError, RunConfig, flatten, load_config, parse_config, unflatten

BAD_CONFIGS = [
    # (TOML text, extra CLI args, text the one-line error must contain)
    ("roundz = 3", [], "unknown key 'roundz' (did you mean 'rounds'?)"),
    ("[data]\nalpah = 0.1", [], "unknown key 'data.alpah' (did you mean 'data.alpha'?)"),
    ("[optimizer]\nlr = 0.1", [], "unknown key 'optimizer'"),
    ('rounds = "ten"', [], "rounds = 'ten' has the wrong type; expected an integer"),
    ("rounds = true", [], "rounds = True has the wrong type"),
    ("rounds = 0", [], "rounds = 0 is out of range; expected an integer >= 1"),
    ("seed = -1", [], "seed = -1 is out of range"),
    ("[data]\nalpha = 0", [], "data.alpha = 0.0 is out of range; expected a number > 0"),
    ("[data]\nnum_clients = 2.5", [], "data.num_clients = 2.5 has the wrong type"),
    ('[data]\ndataset = "imagenet"', [], "data.dataset = 'imagenet' is not one of"),
    ('[data]\npartitioner = "natural"', [], "data.partitioner = 'natural' applies to datasets"),
    ('[data]\ndataset = "synthetic"', [], "got dataset='synthetic', partitioner='dirichlet'"),
    ("[data]\ntest_fraction = 1.5", [], "data.test_fraction = 1.5 is out of range"),
    ("[strategy]\nclients_per_round = 101", [], "strategy.clients_per_round = 101 exceeds"),
    ('[strategy]\nname = "fedprox"', [], "strategy.name = 'fedprox' is not one of"),
    ('[model]\nname = "resnet"', [], "model.name = 'resnet' is not one of"),
    ('[client]\nlr = "fast"', [], "client.lr = 'fast' has the wrong type; expected a number"),
    ('[client]\ndevice = "gpu"', [], "client.device = 'gpu' is out of range"),
    ('[engine]\nname = "spark"', [], "engine.name = 'spark' is not allowed"),
    ('name = "../etc"', [], "name = '../etc' is out of range"),
    ("data = 5", [], "data must be a table"),
    ("rounds = ", [], "invalid TOML"),
    ("", ["--set", "rounds"], "expected KEY=VALUE"),
    ("", ["--set", "rounds=abc"], "rounds = 'abc' has the wrong type"),
    ("", ["--set", "rounds.x=1"], "rounds = {'x': 1} has the wrong type"),
]


@pytest.mark.parametrize(("toml", "extra", "expected"), BAD_CONFIGS)
def test_bad_config_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, extra: list[str], expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    code = main(["run", str(path), *extra])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err.replace("\n", ""), err


def test_missing_config_file_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no/such/file.toml"]) == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err


def test_defaults_and_overrides() -> None:
    config = parse_config({"data": {"num_clients": 20}, "strategy": {"clients_per_round": 4}})
    assert config.data.num_clients == 20 and config.data.dataset == "digits"
    assert config.client.lr == 0.05 and isinstance(config.client.lr, float)


def test_set_overrides_apply_toml_values_and_bare_strings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[data]\ndataset = "digits"\n')
    config = load_config(
        path, ["rounds=7", "data.alpha=0.1", "data.partitioner=iid", "client.lr=1e-2"]
    )
    assert (config.rounds, config.data.alpha, config.data.partitioner) == (7, 0.1, "iid")
    assert config.client.lr == 0.01


def test_flat_flower_run_config_round_trips() -> None:
    config = parse_config({"rounds": 3, "data": {"alpha": 0.3}, "engine": {"name": "flower"}})
    assert parse_config(unflatten(flatten(config))) == config
    assert flatten(config)["data.alpha"] == 0.3


def test_config_is_frozen_and_hashable() -> None:
    config = RunConfig()
    with pytest.raises(AttributeError):
        config.rounds = 5  # type: ignore[misc]
    assert hash(config) == hash(RunConfig())


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="rounds"):
        parse_config({"rounds": -3})
    assert issubclass(ConfigError, ValueError)


def test_config_choices_match_what_the_library_builds() -> None:
    import typing

    from fedsim.config import DataConfig
    from fedsim.data.federated import DATASETS, PARTITIONERS
    from fedsim.registry import ONLY_NATURAL

    hints = typing.get_type_hints(DataConfig)
    for dataset in DATASETS:  # every shipped name is accepted by the config
        partitioner = "natural" if dataset in ONLY_NATURAL else "iid"
        parse_config({"data": {"dataset": dataset, "partitioner": partitioner}})
    assert set(typing.get_args(hints["partitioner"])) == set(PARTITIONERS)
