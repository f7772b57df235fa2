"""Every strategy Flower exports, driven by Flower's own ``Strategy.start`` on any grid.

What an outside Flower user brings to fedsim: a hand-written Message-API
ClientApp (no fedsim helpers) and ``flwr.serverapp.strategy`` as it is. The
client fits a linear model to its partition with a few float32 gradient steps, in
NumPy, so it computes the same bits on every engine; for Flower's XGBoost
strategies it answers with a one-tree booster in XGBoost's JSON layout. The DP
wrappers run with Flower's client mods, which a routing mod applies when the
server's config asks for clipping.

``python -m tests.flower_compat OUT.npz`` runs every strategy under Flower's
``run_simulation`` and saves the final arrays, for comparison with fedsim's engines.
"""

import json
import random
import sys
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flower
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

NUM_NODES = 8
NUM_ROUNDS = 2
FEATURES = 5
STEPS, LR = 5, 0.1


def partition_data(partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A partition of unequal size: ``y = X w + noise`` with a partition-specific shift."""
    rng = np.random.default_rng(1000 + partition_id)
    x = rng.normal(size=(10 + 3 * partition_id, FEATURES)).astype(np.float32)
    w = np.arange(1, FEATURES + 1, dtype=np.float32) / FEATURES
    y = (
        x @ w
        + np.float32(0.1 * partition_id)
        + rng.normal(scale=0.1, size=len(x)).astype(np.float32)
    )
    return x, y.astype(np.float32)


def _loss(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x @ w + b[0] - y) ** 2))


def _booster(leaf: float) -> bytes:
    """A one-tree model in XGBoost's JSON layout, what Flower's XGBoost strategies merge."""
    model = {
        "gbtree_model_param": {"num_trees": "1", "num_parallel_tree": "1"},
        "iteration_indptr": [0, 1],
        "trees": [{"id": 0, "leaf": round(leaf, 6)}],
        "tree_info": [0],
    }
    return json.dumps({"learner": {"gradient_booster": {"model": model}}}).encode()


def clipping_mods(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply Flower's client-side DP mod that the server's config asks for, if any."""
    config = message.content.config_records.get("config", ConfigRecord())
    if KEY_CLIPPING_NORM not in config:
        return call_next(message, context)
    mod = adaptiveclipping_mod if config.get("dp-adaptive") else fixedclipping_mod
    return mod(message, context, call_next)


app = ClientApp()


@app.train(mods=[clipping_mods])
def train(message: Message, context: Context) -> Message:
    """Take ``STEPS`` gradient steps from the server's model on this partition."""
    x, y = partition_data(int(context.node_config["partition-id"]))
    arrays = message.content["arrays"]
    if "w" not in arrays:  # XGBoost: a tree whose leaf is this partition's mean
        model = ArrayRecord([np.frombuffer(_booster(float(y.mean())), dtype=np.uint8)])
        metrics = MetricRecord({"num-examples": len(x)})
        return Message(RecordDict({"arrays": model, "metrics": metrics}), reply_to=message)
    w, b = arrays["w"].numpy().copy(), arrays["b"].numpy().copy()
    for _ in range(STEPS):
        residual = x @ w + b[0] - y
        w -= np.float32(LR) * (x.T @ residual) * np.float32(2 / len(x))
        b -= np.float32(LR) * residual.mean(dtype=np.float32) * np.float32(2)
    metrics = MetricRecord({"num-examples": len(x), "train_loss": _loss(w, b, x, y)})
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(w), "b": Array(b)}), "metrics": metrics}
    )
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Report the server model's loss on this partition."""
    x, y = partition_data(int(context.node_config["partition-id"]))
    arrays = message.content["arrays"]
    loss = _loss(arrays["w"].numpy(), arrays["b"].numpy(), x, y) if "w" in arrays else 0.0
    metrics = MetricRecord({"num-examples": len(x), "eval_loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


def _fedavg(**kwargs: object) -> flower.FedAvg:
    return flower.FedAvg(fraction_evaluate=0.5, min_available_nodes=NUM_NODES, **kwargs)


#: A factory for every ``Strategy`` subclass in ``flwr.serverapp.strategy``: cohorts of
#: all nodes for training (so any runtime samples the same partitions) and half for
#: evaluation; the DP wrappers around Flower's FedAvg with their client mods.
STRATEGIES: dict[str, Callable[[], flower.Strategy]] = {
    "Bulyan": lambda: flower.Bulyan(min_available_nodes=NUM_NODES),
    "DifferentialPrivacyClientSideAdaptiveClipping": lambda: (
        flower.DifferentialPrivacyClientSideAdaptiveClipping(
            _fedavg(), noise_multiplier=0.1, num_sampled_clients=NUM_NODES
        )
    ),
    "DifferentialPrivacyClientSideFixedClipping": lambda: (
        flower.DifferentialPrivacyClientSideFixedClipping(
            _fedavg(), noise_multiplier=0.1, clipping_norm=0.5, num_sampled_clients=NUM_NODES
        )
    ),
    "DifferentialPrivacyServerSideAdaptiveClipping": lambda: (
        flower.DifferentialPrivacyServerSideAdaptiveClipping(
            _fedavg(), noise_multiplier=0.1, num_sampled_clients=NUM_NODES
        )
    ),
    "DifferentialPrivacyServerSideFixedClipping": lambda: (
        flower.DifferentialPrivacyServerSideFixedClipping(
            _fedavg(), noise_multiplier=0.1, clipping_norm=0.5, num_sampled_clients=NUM_NODES
        )
    ),
    "FedAdagrad": lambda: flower.FedAdagrad(min_available_nodes=NUM_NODES),
    "FedAdam": lambda: flower.FedAdam(min_available_nodes=NUM_NODES),
    "FedAvg": _fedavg,
    "FedAvgM": lambda: flower.FedAvgM(min_available_nodes=NUM_NODES, server_momentum=0.9),
    "FedMedian": lambda: flower.FedMedian(min_available_nodes=NUM_NODES),
    "FedProx": lambda: flower.FedProx(min_available_nodes=NUM_NODES, proximal_mu=0.1),
    "FedTrimmedAvg": lambda: flower.FedTrimmedAvg(min_available_nodes=NUM_NODES),
    "FedXgbBagging": lambda: flower.FedXgbBagging(min_available_nodes=NUM_NODES),
    "FedXgbCyclic": lambda: flower.FedXgbCyclic(min_available_nodes=NUM_NODES),
    "FedYogi": lambda: flower.FedYogi(min_available_nodes=NUM_NODES),
    "Krum": lambda: flower.Krum(min_available_nodes=NUM_NODES),
    "MultiKrum": lambda: flower.MultiKrum(min_available_nodes=NUM_NODES, num_nodes_to_select=3),
    "QFedAvg": lambda: flower.QFedAvg(client_learning_rate=LR, min_available_nodes=NUM_NODES),
}


def initial_arrays(name: str) -> ArrayRecord:
    """The model before round 1: an empty booster for XGBoost, zeros otherwise."""
    if name.startswith("FedXgb"):
        return ArrayRecord([np.zeros(0, dtype=np.uint8)])
    return ArrayRecord(
        {"w": Array(np.zeros(FEATURES, np.float32)), "b": Array(np.zeros(1, np.float32))}
    )


def run_strategy(name: str, grid: Grid) -> list[np.ndarray]:
    """Run ``name`` for ``NUM_ROUNDS`` with Flower's ``start``; return the final arrays.

    Flower's strategies draw cohorts from ``random`` and DP noise from
    ``np.random``: both are seeded first, so every runtime draws the same.
    """
    random.seed(0)
    np.random.seed(0)
    strategy = STRATEGIES[name]()
    config = ConfigRecord({"dp-adaptive": "Adaptive" in name})
    result = strategy.start(
        grid=grid, initial_arrays=initial_arrays(name), num_rounds=NUM_ROUNDS, train_config=config
    )
    return [array.numpy() for array in result.arrays.values()]


def _run_simulation(out: str) -> None:
    """Run every strategy under Flower's ``run_simulation``; save the arrays to ``out``."""
    from flwr.simulation import run_simulation

    finals: dict[str, np.ndarray] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for name in STRATEGIES:
            for index, array in enumerate(run_strategy(name, grid)):
                finals[f"{name}/{index}"] = array

    run_simulation(
        server_app=server,
        client_app=app,
        num_supernodes=NUM_NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    np.savez(out, **finals)


if __name__ == "__main__":
    _run_simulation(sys.argv[1])
