"""The sweep of ``bvr_heterogeneity.py``: methods, what varies and what is held fixed."""

from dataclasses import dataclass

METHODS = {
    "minibatch-sgd": "Minibatch SGD",
    "sarah": "SARAH",
    "local-sgd": "Local SGD",
    "scaffold": "SCAFFOLD",
    "bvr-l-sgd": "BVR-L-SGD",
}
LOCAL_METHODS = ("local-sgd", "scaffold", "bvr-l-sgd")
METRICS = ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy")
TRAFFIC = ("exchanges", "downlink_floats", "uplink_floats")
METRICS = ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy")
TRAFFIC = ("exchanges", "downlink_floats", "uplink_floats")


@dataclass(frozen=True)
class Settings:
    """The sweep: what varies (q, η, seed) and what is held fixed."""

    qs: tuple[float, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    rounds: int
    num_workers: int = 10
    budget: int = 64
    local_batch: int = 16
    stage_rounds: int = 10
    hidden: int = 64
    test_fraction: float = 0.3

    def __post_init__(self) -> None:
        if not (self.qs and self.lrs and self.seeds) or self.rounds < 1:
            raise ValueError("need at least one q, step size, seed and round")
        if self.budget % self.local_batch:
            raise ValueError(f"budget {self.budget} must be a multiple of b={self.local_batch}")

    @property
    def local_steps(self) -> int:
        """K = B / b, so that every method computes B gradients per worker per round."""
        return self.budget // self.local_batch


FULL = Settings(
    qs=(0.0, 0.25, 0.5, 0.75, 1.0),
    lrs=(0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
    seeds=(0, 1, 2, 3, 4),
    rounds=100,
)
QUICK = Settings(qs=(0.0, 1.0), lrs=(0.05, 0.5), seeds=(0,), rounds=5)
