"""Shared fixtures: small Flower messages and a throwaway run directory."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedsim.arrays import to_array_record
from fedsim.engine.identity import claim_server_identity


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    # Message(...) needs a task identity; engines set it, bare unit tests set it here.
    claim_server_identity(run_id=1)


def reply(node_id: int, arrays: dict[str, np.ndarray] | None, **metrics: float) -> Message:
    """A train/evaluate reply from ``node_id`` carrying ``arrays`` and ``metrics``."""
    instruction = Message(RecordDict(), node_id + 0, "train")
    instruction.metadata.__dict__["_message_id"] = f"m{node_id}"
    content = RecordDict({"metrics": MetricRecord(dict(metrics))})
    if arrays is not None:
        content["arrays"] = to_array_record(arrays)
    message = Message(content, reply_to=instruction)
    return message


def arrays_record(**arrays: np.ndarray) -> ArrayRecord:
    return to_array_record(arrays)
