"""Run checkpoints: everything a run needs to continue after its last finished round.

Seeds derive from ``(seed, round, node, purpose)``, so no random-generator state
needs saving: a run resumed after round r replays rounds r+1... exactly as an
uninterrupted run would, provided the global model, the strategy's server state
(SARAH's estimate, SCAFFOLD's control variate) and the nodes' ``Context.state``
(remembered points, client control variates) are restored. The loop saves these
after every round through :class:`RunCheckpoint`; strategies and grids take part
by having ``state_dict``/``load_state_dict``.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from flwr.app import ArrayRecord

from fedsim.atomic import replacing

logger = logging.getLogger(__name__)


@runtime_checkable
class Stateful(Protocol):
    """A strategy or grid whose state a checkpoint saves."""

    def state_dict(self) -> dict[str, Any]:
        """Return the state as plain data (NumPy arrays, records, numbers)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclass(frozen=True)
class Saved:
    """A checkpoint's content."""

    round: int
    arrays: ArrayRecord
    strategy: dict[str, Any] | None
    grid: dict[str, Any] | None


class CheckpointError(ValueError):
    """A checkpoint file cannot be read back (cut short, damaged, or not a checkpoint)."""


def _checked(state: object, path: Path) -> Saved:
    """Return ``state`` as :class:`Saved` if it has a checkpoint's fields and types."""
    fields = {"round", "arrays", "strategy", "grid"}
    if not isinstance(state, dict) or state.keys() != fields:
        got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} holds {got}, not a checkpoint's {sorted(fields)}")
    round_ = state["round"]
    if not (isinstance(round_, int) and not isinstance(round_, bool) and round_ >= 0):
        raise CheckpointError(f"{path}: its round is {round_!r}, not an integer >= 0")
    if not isinstance(state["arrays"], ArrayRecord):
        raise CheckpointError(f"{path}: its arrays are a {type(state['arrays']).__name__}")
    for part in ("strategy", "grid"):
        if not isinstance(state[part], dict | None):
            raise CheckpointError(f"{path}: its {part} state is a {type(state[part]).__name__}")
    return Saved(**state)


class RunCheckpoint:
    """One run's checkpoint file, written atomically after every ``every`` rounds."""

    def __init__(self, path: Path, *, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.path, self.every = Path(path), every

    def load(self) -> Saved | None:
        """Return the saved state, or ``None`` when there is no checkpoint.

        A file that is not a whole checkpoint (cut short, damaged, something else)
        raises :class:`CheckpointError`, in one line naming it.
        """
        if not self.path.exists():
            return None
        try:
            # Our own file (pickled records and arrays), hence weights_only=False.
            state = torch.load(self.path, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - torch, zipfile and pickle raise many kinds
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise CheckpointError(f"{self.path} is not a readable checkpoint ({reason})") from None
        return _checked(state, self.path)

    def save(self, round_: int, arrays: ArrayRecord, strategy: object, grid: object) -> None:
        """Save after ``round_`` if it is due; a kill mid-write keeps the previous file."""
        if round_ % self.every:
            return
        state = {
            "round": round_,
            "arrays": arrays,
            "strategy": strategy.state_dict() if isinstance(strategy, Stateful) else None,
            "grid": grid.state_dict() if isinstance(grid, Stateful) else None,
        }
        with replacing(self.path) as partial:
            torch.save(state, partial)

    def restore(self, strategy: object, grid: object) -> Saved | None:
        """Load the checkpoint into ``strategy`` and ``grid``; return it (``None``: none)."""
        saved = self.load()
        if saved is None:
            return None
        if saved.strategy is not None and isinstance(strategy, Stateful):
            strategy.load_state_dict(saved.strategy)
        if isinstance(grid, Stateful) and saved.grid is not None:
            grid.load_state_dict(saved.grid)
        else:
            logger.warning(
                "Resuming on a grid that cannot restore its nodes' Context.state; "
                "clients start with empty state"
            )
        return saved
