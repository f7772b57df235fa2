"""Whole runs through the CLI: result files, reproducibility, failures, Flower's runtime."""

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsim.app import client_app as deployed_client_app
from fedsim.cli import main
from fedsim.config import flatten, load_config, parse_config
from fedsim.engine import InlineGrid
from fedsim.experiment import build_task, initial_arrays, run_on_grid
from tests.conftest import DEMO_CONFIG as DEMO
from tests.conftest import run_cli

SMALL_SETTINGS = (
    "rounds=3",
    "data.num_clients=20",
    "strategy.clients_per_round=5",
    "progress=false",
)
SMALL = [arg for setting in SMALL_SETTINGS for arg in ("--set", setting)]


def _run(tmp_path: Path, name: str, *extra: str) -> Path:
    args = ["run", DEMO, *SMALL, "--set", f"output_dir={tmp_path}", "--set", f"name={name}", *extra]
    assert main(args) == 0
    return tmp_path / name


def test_a_run_leaves_metrics_summary_plot_and_model(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, "small")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all("central_accuracy" in r and "central_loss" in r for r in rows)
    assert all(r["replies"] == 5 and r["failures"] == 0 for r in rows[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 3
    assert summary["accuracy"] == rows[-1]["central_accuracy"]
    assert summary["wall_time_s"] > 0
    assert (run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "config.json").read_text())["data"]["num_clients"] == 20
    assert set(torch.load(run_dir / "model.pt")) == set(
        build_task(parse_config({})).model_fn().state_dict()
    )


def test_same_seed_gives_bit_identical_weights_other_seed_does_not(tmp_path: Path) -> None:
    first = torch.load(_run(tmp_path, "a") / "model.pt")
    again = torch.load(_run(tmp_path, "b") / "model.pt")
    other = torch.load(_run(tmp_path, "c", "--set", "seed=1") / "model.pt")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def _grid_with(client_app: ClientApp, config) -> InlineGrid:
    return InlineGrid(client_app, num_nodes=config.data.num_clients)


def _config(tmp_path: Path):
    return parse_config(
        {
            "rounds": 4,
            "output_dir": str(tmp_path),
            "name": "f",
            "progress": False,
            "data": {"num_clients": 10},
            "strategy": {"clients_per_round": 3},
        }
    )


def test_failing_clients_are_counted_and_leave_the_model_unchanged(tmp_path: Path) -> None:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        raise RuntimeError("out of memory")

    config = _config(tmp_path)
    summary = run_on_grid(config, _grid_with(app, config), engine="inline")
    assert summary["status"] == "completed" and summary["failures"] == 4 * 3
    final = torch.load(config.run_dir / "model.pt")
    initial = initial_arrays(build_task(config), config.seed).to_torch_state_dict()
    assert all(torch.equal(final[k], initial[k]) for k in final)


def test_an_interrupted_run_keeps_its_rounds_and_says_so(tmp_path: Path) -> None:
    config = _config(tmp_path)
    real = build_task(config)
    from fedsim.clients import TorchClient

    client, app = TorchClient(real), ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        if message.content["config"]["server-round"] == 3:
            raise KeyboardInterrupt
        return client.train(message, context)

    with pytest.raises(KeyboardInterrupt):
        run_on_grid(config, _grid_with(app, config), engine="inline")
    rows = (config.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [0, 1, 2]
    assert json.loads((config.run_dir / "summary.json").read_text())["status"] == "interrupted"


def test_an_offline_real_dataset_fails_in_one_line(tmp_path: Path) -> None:
    # A subprocess, because huggingface_hub reads its offline switches at import.
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = run_cli(*SMALL_SETTINGS, f"output_dir={tmp_path}", "data.dataset=mnist", env=offline)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "DatasetUnavailableError" in done.stderr and "mnist" in done.stderr


# Paper-scale configs that download their data run offline, shrunk, in their own tests.
ELSEWHERE = {"gswgan-mnist": "tests/test_gs_wgan.py, on generated 28x28 images"}
# What makes a config's run long without changing what its rounds exercise.
SHORTER = {
    "gswgan-digits": (
        "strategy.params.iterations_per_round=5",
        "strategy.params.warm_start_steps=2",
        "strategy.params.evaluate_samples_per_class=10",
        "strategy.params.evaluate_classifier_epochs=2",
    ),
}
CONFIGS = [
    (path, SHORTER.get(path.stem, ()))
    for path in sorted(Path("experiments/configs").glob("*.toml"))
    if path.stem not in ELSEWHERE
]
PRIVATE = {  # the demo under each privacy mechanism that draws noise or masks on clients or server
    "dp-sgd": ("client.dp_sgd=true",),
    "local-dp": ("privacy.local_dp=true",),
    "central-dp": ("privacy.central_dp=true", "privacy.noise_multiplier=0.5"),
    "secure-aggregation": ("privacy.secure_aggregation=true", "privacy.local_dp=true"),
}


@pytest.mark.parametrize(
    ("config", "extra"),
    CONFIGS + [(Path(DEMO), extra) for extra in PRIVATE.values()],
    ids=[path.stem for path, _ in CONFIGS] + [f"demo-{name}" for name in PRIVATE],
)
def test_every_shipped_config_runs_bit_identically_inline_on_threads_and_in_flwr_apps(
    config: Path, extra: tuple[str, ...], tmp_path: Path, one_torch_thread: None
) -> None:
    # The threads engine's workers run torch on one thread, so the inline run does too.
    # "flwr-app" is the ClientApp that `flwr run` deploys (fedsim.app:client_app, its
    # config read from each message's run config) on the inline transport.
    overrides = [
        *extra,
        "rounds=2",
        "eval_every=2",
        f"output_dir={tmp_path}",
        "progress=false",
        "plot=false",
        "engine.num_actors=2",
    ]
    models = {}
    for engine in ("inline", "threads"):
        args = [
            arg
            for override in (*overrides, f"engine.name={engine}", f"name={engine}")
            for arg in ("--set", override)
        ]
        assert main(["run", str(config), *args]) == 0
        summary = json.loads((tmp_path / engine / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["failures"] == 0
        assert summary["engine"] == engine
        models[engine] = torch.load(tmp_path / engine / "model.pt")
    assert summary["workers"] == 2
    flwr_config = load_config(config, [*overrides, "name=flwr-app"])
    with InlineGrid(
        deployed_client_app, num_nodes=flwr_config.data.num_clients, run_config=flatten(flwr_config)
    ) as grid:
        run_on_grid(flwr_config, grid, engine="flwr-app")
    models["flwr-app"] = torch.load(tmp_path / "flwr-app" / "model.pt")
    inline = models["inline"]
    for system in ("threads", "flwr-app"):
        differ = [k for k in inline if not torch.equal(inline[k], models[system][k])]
        assert not differ, (system, differ)


@pytest.mark.slow
def test_demo_reaches_ninety_percent(tmp_path: Path) -> None:
    assert main(["run", DEMO, "--set", f"output_dir={tmp_path}", "--set", "progress=false"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["accuracy"] >= 0.90, summary


@pytest.mark.slow
def test_flowers_run_simulation_gives_the_inline_model_bit_for_bit(tmp_path: Path) -> None:
    # SCAFFOLD, through the multi-exchange seam: round 2 needs the control variates the
    # clients left in Flower's node contexts in round 1. Full participation, so the
    # cohort does not depend on Flower's random node ids; client seeds key on
    # partition-id. Ray's workers run torch on one thread, so the inline run does too
    # (thread count changes float reduction order in kernels).
    for engine in ("inline", "flower"):
        done = run_cli(
            "rounds=2", "data.num_clients=4", "strategy.clients_per_round=4",
            "strategy.name=scaffold", "strategy.local_steps=3", "model.name=mlp",
            f"engine.name={engine}", f"name={engine}", f"output_dir={tmp_path}",
            env={"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    inline, flower = (torch.load(tmp_path / e / "model.pt") for e in ("inline", "flower"))
    assert all(torch.equal(inline[k], flower[k]) for k in inline)
    assert json.loads((tmp_path / "flower" / "summary.json").read_text())["engine"] == "flower"
    counted = ("exchanges", "replies", "failures", "downlink_floats", "uplink_floats")
    rows = {e: [json.loads(line) for line in (tmp_path / e / "metrics.jsonl").open()][1:]
            for e in ("inline", "flower")}  # fmt: skip
    assert [[r[k] for k in counted] for r in rows["flower"]] == [
        [r[k] for k in counted] for r in rows["inline"]
    ]
    assert all(r["replies"] == 4 and r["failures"] == 0 for r in rows["flower"])


def test_simulated_devices_are_reported_per_round_and_in_the_summary(tmp_path: Path) -> None:
    csv = tmp_path / "devices.csv"
    rows = ["partition_id,speed,availability,bandwidth_mbps"]
    # Partitions 0-9 always answer but are so slow they miss any deadline; the rest are fast.
    rows += [f"{p},{1e-6 if p < 10 else 100.0},1.0,1000" for p in range(20)]
    csv.write_text("\n".join(rows) + "\n")
    run_dir = _run(
        tmp_path, "devices", "--set", "devices.enabled=true", "--set", f"devices.csv={csv}",
        "--set", "devices.deadline_s=5.0",
    )  # fmt: skip
    reports = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    for report in reports[1:]:
        assert report["late"] == report["failures"] > 0  # the sampled slow partitions
        assert 0 < report["simulated_s"] <= 5.0
    assert summary["late"] == sum(r["late"] for r in reports) and summary["unavailable"] == 0
    assert summary["simulated_time_s"] == pytest.approx(
        sum(r["simulated_s"] for r in reports[1:]), abs=1e-2
    )


def test_a_bad_device_csv_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "devices.csv"
    csv.write_text("partition_id,speed,availability,bandwidth_mbps\n0,fast,1.0,10\n")
    args = ["run", DEMO, *SMALL, "--set", f"output_dir={tmp_path}", "--set", "devices.enabled=true",
            "--set", f"devices.csv={csv}"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "line 2, column 'speed'" in err and len(err.strip().splitlines()) == 1
