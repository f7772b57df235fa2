"""Federated GS-WGAN: routing, messages, client state, partitions, engines and resume."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn
from torch.utils.data import TensorDataset

from fedsim import keys
from fedsim.algorithm import ClientAction
from fedsim.arrays import arrays_of, to_array_record
from fedsim.cli import main
from fedsim.clients import TorchClient, TorchTask, make_client_app
from fedsim.config import ConfigError, load_config
from fedsim.data import build_federated_data
from fedsim.engine import InlineGrid
from fedsim.experiment import build_task, run_on_grid
from fedsim.gan_training import image_gradients
from fedsim.loop import run_rounds
from fedsim.models.gs_wgan import small_discriminator
from fedsim.strategies.gs_wgan import GSWGAN, gswgan_step
from tests.conftest import run_script

CONFIG = "experiments/configs/gswgan-digits.toml"
# 6 clients, 2 rounds of 3 iterations, a short warm start: seconds on a CPU.
SMALL = [
    "data.num_clients=6", "rounds=2", "strategy.params.iterations_per_round=3",
    "strategy.params.batch_size=16", "strategy.params.critic_steps=2",
    "strategy.params.warm_start_steps=2", "strategy.params.clients_per_iteration=2",
    "strategy.params.evaluate_samples_per_class=0", "progress=false", "plot=false",
]  # fmt: skip
SHAPE = (1, 8, 8)


class LinearGenerator(nn.Module):
    """x~ = W [z; one-hot(y)]: the generator whose parameter gradient has a closed form."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim, self.num_classes, self.image_shape = latent_dim, num_classes, input_shape
        self.linear = nn.Linear(latent_dim + num_classes, int(np.prod(input_shape)), bias=False)
        self.inputs: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([z, nn.functional.one_hot(labels, self.num_classes).float()], dim=1)
        self.inputs.append(inputs)
        return self.linear(inputs).view(-1, *self.image_shape)


def linear_generator(
    input_shape: tuple[int, ...], num_classes: int, latent_dim: int = 10
) -> LinearGenerator:
    return LinearGenerator(input_shape, num_classes, latent_dim)


class RecordingGrid(InlineGrid):
    """An inline grid that keeps every message it sends and every reply it gets."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _digits_task(num_clients: int) -> TorchTask:
    data = build_federated_data(
        dataset="digits", partitioner="iid", num_clients=num_clients, seed=0
    )
    return TorchTask(
        model_fn=lambda: small_discriminator(SHAPE, 10),
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=lambda pid, _n: data.client_dataset(pid),
    )


def _strategy(**settings: object) -> GSWGAN:
    defaults: dict[str, object] = {
        "input_shape": SHAPE, "num_classes": 10, "batch_size": 16, "critic_steps": 2,
        "iterations_per_round": 2, "evaluate_samples_per_class": 0,
    }  # fmt: skip
    return GSWGAN(**{**defaults, **settings})  # type: ignore[arg-type]


def _run_strategy(strategy: GSWGAN, num_clients: int = 4) -> RecordingGrid:
    app = make_client_app(_digits_task(num_clients), algorithms=[GSWGAN])
    grid = RecordingGrid(app, num_nodes=num_clients)
    run_rounds(
        strategy=strategy,
        grid=grid,
        initial_arrays=strategy.initial_arrays(),
        num_rounds=1,
        train_config=ConfigRecord({keys.SEED: 0}),
    )
    return grid


def test_the_discriminator_gets_no_gradient_from_the_generator_step() -> None:
    discriminator = small_discriminator(SHAPE, 10)
    fakes = torch.rand(8, *SHAPE)
    gradients = image_gradients(discriminator, fakes, torch.arange(8))
    assert gradients.shape == fakes.shape
    assert all(p.grad is None for p in discriminator.parameters())


def test_a_linear_generator_gets_the_closed_form_gradient_sum_of_g_z() -> None:
    strategy = _strategy(
        generator="tests.test_gs_wgan:linear_generator",
        iterations_per_round=1,
        clients_per_iteration=2,
        noise_multiplier=1.0,
    )
    grid = _run_strategy(strategy)
    (inputs,) = strategy.model.inputs
    replies = [arrays_of(r.content[keys.GRADIENTS])[keys.IMAGES] for r in grid.replies]
    assert len(replies) == 2
    mean = torch.from_numpy(np.mean(replies, axis=0)).flatten(1)  # the m clients' mean g^
    # d/dW sum_i <g^_i, W u_i> = sum_i g^_i u_i^T, u_i = [z_i; one-hot(y_i)]
    expected = mean.T @ inputs
    torch.testing.assert_close(strategy.model.linear.weight.grad, expected)


def test_messages_carry_only_generated_images_labels_and_sanitized_gradients() -> None:
    strategy = _strategy(clients_per_iteration=2)
    grid = _run_strategy(strategy)
    assert len(grid.sent) == 4 and len(grid.replies) == 4  # 2 iterations x 2 clients
    parameter_shapes = {
        tuple(p.shape)
        for model in (strategy.model, small_discriminator(SHAPE, 10))
        for p in model.state_dict().values()
    }
    for message in grid.sent:
        assert message.metadata.message_type == keys.TRAIN_GSWGAN
        assert set(message.content) == {keys.FAKES, keys.CONFIG}
        fakes = arrays_of(message.content[keys.FAKES])
        assert {k: v.shape for k, v in fakes.items()} == {
            keys.IMAGES: (16, *SHAPE),
            keys.LABELS: (16,),
        }
        assert fakes[keys.LABELS].dtype == np.int64
        config = message.content[keys.CONFIG]
        assert all(isinstance(v, int | float | str | bool) for v in config.values())
    for reply in grid.replies:
        assert set(reply.content) == {keys.GRADIENTS}
        (gradients,) = arrays_of(reply.content[keys.GRADIENTS]).values()
        assert gradients.shape == (16, *SHAPE)
    assert (16, *SHAPE) not in parameter_shapes  # no parameter could pass for an image batch


def _client_reply(records: torch.Tensor, labels: torch.Tensor, message: Message) -> np.ndarray:
    task = TorchTask(
        model_fn=lambda: small_discriminator(SHAPE, 10),
        loss_fn=nn.CrossEntropyLoss(),
        load_partition=lambda _pid, _n: TensorDataset(records, labels),
    )
    context = Context(
        run_id=1, node_id=1, node_config={keys.PARTITION_ID: 0, keys.NUM_PARTITIONS: 1},
        state=RecordDict(), run_config={},
    )  # fmt: skip
    reply = gswgan_step(TorchClient(task), message, context)
    return arrays_of(reply.content[keys.GRADIENTS])[keys.IMAGES]


def test_replacing_one_record_of_a_client_changes_all_b_of_its_gradients() -> None:
    """The joint accounting's premise: one record moves every one of the B gradients."""
    batch, rng = 16, torch.Generator().manual_seed(0)
    records, labels = torch.rand(batch, *SHAPE, generator=rng), torch.arange(batch) % 10
    neighbour = records.clone()
    neighbour[5] = torch.rand(*SHAPE, generator=rng)  # one record replaced
    strategy = _strategy(batch_size=batch, noise_multiplier=0.0, warm_start_steps=1)
    config = strategy._client_config(ConfigRecord({keys.SEED: 0}), iteration=1)
    fakes = to_array_record(
        {
            keys.IMAGES: torch.rand(batch, *SHAPE, generator=rng).numpy(),
            keys.LABELS: (torch.arange(batch) % 10).numpy(),
        }
    )
    message = Message(
        RecordDict({keys.FAKES: fakes, keys.CONFIG: ConfigRecord({**config, "server-round": 1})}),
        dst_node_id=1,
        message_type=keys.TRAIN_GSWGAN,
    )
    original = _client_reply(records, labels, message)
    changed = _client_reply(neighbour, labels, message)
    again = _client_reply(records, labels, message)
    np.testing.assert_array_equal(original, again)  # the reply is a function of the data
    differs = np.any(original.reshape(batch, -1) != changed.reshape(batch, -1), axis=1)
    assert differs.all(), f"rows unchanged: {np.flatnonzero(~differs)}"


def test_a_node_keeps_its_discriminator_and_adam_moments_in_context_state() -> None:
    strategy = _strategy(iterations_per_round=3, clients_per_iteration=1)
    grid = _run_strategy(strategy, num_clients=1)
    (state,) = grid.state_dict()["states"].values()
    stored = arrays_of(state[keys.DISCRIMINATOR])
    fresh = small_discriminator(SHAPE, 10).state_dict()
    assert set(stored) == set(fresh)
    moments = arrays_of(state[keys.CRITIC_OPTIMIZER])
    steps = {float(v) for k, v in moments.items() if k.endswith(".step")}
    assert steps == {3 * 2}  # 3 iterations x 2 critic steps, none lost between messages


def test_the_blocks_are_disjoint_and_covering_and_each_discriminator_sees_its_own() -> None:
    data = build_federated_data(dataset="digits", partitioner="iid", num_clients=20, seed=0)
    blocks = [set(part.tolist()) for part in data.partitions]
    assert sum(len(b) for b in blocks) == len(set().union(*blocks)) == len(data.central.train_y)
    task = _digits_task(20)
    for node in (0, 7, 19):
        x, y = task.load_partition(node, 20).tensors
        torch.testing.assert_close(x, data.central.train_x[data.partitions[node]])
        torch.testing.assert_close(y, data.central.train_y[data.partitions[node]])


def _run(tmp_path: Path, name: str, *overrides: str, resume: bool = False) -> int:
    sets = [f"output_dir={tmp_path}", f"name={name}", *SMALL, *overrides]
    args = ["run", CONFIG, *[a for s in sets for a in ("--set", s)]]
    return main([*args, "--resume"] if resume else args)


def _generator_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt")


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_inline_threads_and_ray_give_bit_identical_generators(tmp_path: Path) -> None:
    # Convolutions sum in an order that depends on torch's thread count: every engine's
    # clients run with one thread (threads and Ray take it from num_cpus_per_client = 1).
    for engine in ("inline", "threads", "ray"):
        engine_settings = [f"engine.name={engine}", "engine.num_actors=2", "engine.torch_threads=1"]
        assert _run(tmp_path, engine, *engine_settings) == 0
    inline = _generator_of(tmp_path / "inline")
    assert any(k.startswith("generator.") for k in inline)
    assert any(k.startswith("ema.") for k in inline)
    assert _equal(inline, _generator_of(tmp_path / "threads"))
    assert _equal(inline, _generator_of(tmp_path / "ray"))


def test_resume_after_a_crash_gives_the_uninterrupted_generator(tmp_path: Path) -> None:
    overrides = [f"output_dir={tmp_path}", *SMALL, "rounds=3", "name=crashed"]
    config = load_config(CONFIG, overrides)

    def crashes_in_round_three(client: TorchClient, message: Message, context: Context) -> Message:
        if message.content["config"]["server-round"] == 3:
            raise KeyboardInterrupt
        return gswgan_step(client, message, context)

    class CrashingGSWGAN(GSWGAN):
        client_actions = (ClientAction(keys.TRAIN_GSWGAN, crashes_in_round_three),)

    app = make_client_app(build_task(config), algorithms=[CrashingGSWGAN])
    with (
        InlineGrid(app, num_nodes=config.data.num_clients) as grid,
        pytest.raises(KeyboardInterrupt),
    ):
        run_on_grid(config, grid, engine="inline")
    assert _run(tmp_path, "crashed", "rounds=3", resume=True) == 0
    assert _run(tmp_path, "straight", "rounds=3") == 0
    assert _equal(_generator_of(tmp_path / "crashed"), _generator_of(tmp_path / "straight"))
    rows = [json.loads(line) for line in (tmp_path / "crashed" / "metrics.jsonl").open()]
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    summary = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["epsilon"] == straight["epsilon"] and summary["epsilon_paper"] > 0


def test_both_epsilons_are_reported_every_round(tmp_path: Path) -> None:
    assert _run(tmp_path, "eps", "rounds=2") == 0
    rows = [json.loads(line) for line in (tmp_path / "eps" / "metrics.jsonl").open()]
    joint = [row["privacy_epsilon_joint"] for row in rows[1:]]
    paper = [row["privacy_epsilon_paper"] for row in rows[1:]]
    assert joint == [row["privacy_epsilon"] for row in rows[1:]]  # the guarantee is the joint
    assert joint[0] < joint[1] and paper[0] < paper[1]
    summary = json.loads((tmp_path / "eps" / "summary.json").read_text())
    assert summary["epsilon"] == joint[-1] and summary["epsilon_paper"] == paper[-1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("client.dp_sgd=true", "client.dp_sgd = true is refused"),
        ("privacy.central_dp=true", "privacy.central_dp = true is refused"),
        ("strategy.params.noise_multipler=1.0", "did you mean 'strategy.params.noise_multiplier'"),
        ("strategy.params.batch_size=2.5", "strategy.params.batch_size = 2.5 must be an integer"),
    ],
)
def test_bad_settings_are_refused_in_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(CONFIG, [*SMALL, override])


@pytest.mark.slow
def test_the_mnist_configuration_runs_on_generated_28x28_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper-scale config, its MNIST loader and the paper's models, offline."""
    import datasets as hf
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(80)]
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(num_classes=10)})
    split = hf.Dataset.from_dict(
        {"image": images, "label": [i % 10 for i in range(80)]}, features=features
    )
    requested: list[str] = []

    def load_dataset(name: str) -> hf.DatasetDict:
        requested.append(name)
        return hf.DatasetDict({"train": split, "test": split})

    monkeypatch.setattr(hf, "load_dataset", load_dataset)
    config = load_config(
        "experiments/configs/gswgan-mnist.toml",
        [
            f"output_dir={tmp_path}", "data.num_clients=2", "rounds=1", "progress=false",
            "plot=false", "client.device=cpu", "strategy.params.iterations_per_round=1",
            "strategy.params.critic_steps=1", "strategy.params.warm_start_steps=1",
            "strategy.params.evaluate_samples_per_class=2",
            "strategy.params.evaluate_classifier_epochs=1",
        ],
    )  # fmt: skip
    from fedsim.runner import run_experiment

    summary = run_experiment(config)
    assert requested == ["ylecun/mnist"]
    assert summary["status"] == "completed" and summary["epsilon_paper"] > 0
    generator = torch.load(tmp_path / "gswgan-mnist" / "model.pt")
    assert generator["ema.fc.parametrizations.weight.original"].shape == (256 * 4 * 4, 20)


@pytest.mark.slow
def test_the_digits_experiment_writes_its_table_grids_and_curve(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "experiments" / "gswgan_digits.py"
    run_script(script, "--quick", cwd=tmp_path)
    out = tmp_path / "runs" / "gswgan_digits-quick"
    for name in ("results.json", "table.md", "table.csv", "accuracy_vs_epsilon.png",
                 "samples-sigma-0.png", "samples-sigma-5.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["sigma"] for row in rows] == [0.0, 5.0]
    assert rows[0]["epsilon_joint"] == rows[0]["epsilon_paper"] == math.inf
    assert 0 < rows[1]["epsilon_joint"] < math.inf and 0 < rows[1]["epsilon_paper"] < math.inf
    assert all(0 <= row["downstream_accuracy"] <= 1 for row in rows)
    table = (out / "table.md").read_text()
    assert "joint: the guarantee" in table and "paper's accounting" in table
    assert "real data" in table
    # A full result is never replaced by accident.
    (tmp_path / "runs" / "gswgan_digits").mkdir()
    (tmp_path / "runs" / "gswgan_digits" / "results.json").write_text("{}")
    refused = run_script(script, cwd=tmp_path, returncode=2)
    assert "already holds a result" in refused.stderr


@pytest.mark.slow
def test_the_benchmark_prints_both_ratios(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "gswgan.py"
    done = run_script(script, "--triples", "2", "--iterations", "2", "--warmup", "1")
    assert "inline / centralized: median" in done.stdout
    assert "threads / centralized: median" in done.stdout
