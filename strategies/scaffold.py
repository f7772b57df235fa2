"""SCAFFOLD (Karimireddy et al., ICML 2020, option II), a local baseline of Murata & Suzuki.

Server state: the point x and the control variate c (zero at the start). Each
worker keeps its own c_p in ``Context.state`` (zero on first contact), runs K
corrected local steps y <- y - η_l (g(y; I_k) - c_p + c), and returns
Δy = y - x and Δc = c_p+ - c_p with c_p+ = c_p - c + (x - y) / (K η_l). The server
steps x <- x + η_g mean Δy and c <- c + (|S| / N) mean Δc, |S| the workers that
replied and N the population. 2d each way per worker.
"""

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedsim import keys
from fedsim.arrays import to_array_record
from fedsim.loop import TrainRound
from fedsim.strategies.multi_exchange import GradientStrategy, Vector, shapes_and_vector, step
from fedsim.strategies.sampling import available_nodes


class SCAFFOLD(GradientStrategy):
    """SCAFFOLD; ``lr`` is the local η_l, ``server_lr`` the global η_g (1 in the paper's runs)."""

    def __init__(self, *, server_lr: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr
        self.control: Vector | None = None  # the server's c

    def state_dict(self) -> dict[str, Any]:
        """Return the server's control variate, for run checkpoints."""
        return {"control": self.control}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the control variate from :meth:`state_dict`."""
        self.control = state["control"]

    def train_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> TrainRound:
        """Send x and c; step both with the mean of the workers' changes."""
        shapes, point = shapes_and_vector(arrays)
        control = self.control or {name: value * 0 for name, value in point.items()}
        replies = yield self.send(
            server_round,
            self.workers(server_round, grid),
            keys.TRAIN_SCAFFOLD,
            self.exchange_config(config),
            **{keys.ARRAYS: arrays, keys.CONTROL: to_array_record(control)},
        )
        means, metrics, counted = self.mean_of_replies(replies, shapes, keys.ARRAYS, keys.CONTROL)
        if not counted:
            return None, None
        point_delta, control_delta = means
        share = len(counted) / len(available_nodes(grid, 0))
        self.control = step(control, control_delta, -share)
        return to_array_record(step(point, point_delta, -self.server_lr)), metrics
