"""Faults injected on purpose, to prove that a run tolerates them (``[faults]`` in a config).

Each round, each client sampled for training faults with probability ``fraction``,
and a faulty client does one of ``kinds``, drawn uniformly; both draws come from
``(seed, round, partition, "fault")`` alone, so a run's faults replay exactly on
every engine and after a resume. A faulty client faults on every training
exchange of its round and answers evaluation normally.

======== =================================================== ============================
kind     what the client does                                detected as (``failures_*``)
======== =================================================== ============================
raise    raises instead of training                          ``raised``
hang     sleeps ``hang_s`` (past ``engine.timeout_s``)        ``timeout``
nan      replies a model holding a NaN                       ``non-finite``
inf      replies a model holding an infinity                 ``non-finite``
shape    replies an array one element short                  ``malformed``
dtype    replies an array as float64                         ``malformed``
huge     adds an array 100x the model's size to the reply    ``malformed``
missing  leaves an array out of the reply                    ``malformed``
kill     SIGKILLs its own worker process (Ray only)          ``crashed``
======== =================================================== ============================

Detection is the engines' (``fedsim.engine.execute``): the faults only misbehave,
they never report themselves. A fault is an ordinary Flower mod around the
ClientApp, outermost, so it corrupts what would leave the device.
"""

import os
import signal
import time
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedsim import keys
from fedsim.arrays import to_array_record
from fedsim.records import config_number, records_of
from fedsim.seeding import derive_seed

#: Every fault a config may ask for, and what the engines detect it as.
FAULT_KINDS = {
    "raise": "raised",
    "hang": "timeout",
    "nan": "non-finite",
    "inf": "non-finite",
    "shape": "malformed",
    "dtype": "malformed",
    "huge": "malformed",
    "missing": "malformed",
    "kill": "crashed",
}
HUGE_FACTOR = 100  # a "huge" reply carries this many times the model's elements more


class InjectedFault(RuntimeError):
    """What a client with the ``raise`` fault raises."""


@dataclass(frozen=True)
class FaultPlan:
    """Which clients fault in which round, and how; the same on every engine."""

    fraction: float
    kinds: tuple[str, ...]
    seed: int
    hang_s: float

    def fault_for(self, round_: int, partition_id: int) -> str | None:
        """Return the fault of client ``partition_id`` in ``round_``, or ``None``."""
        if self.fraction <= 0 or not self.kinds:
            return None
        rng = np.random.default_rng(derive_seed(self.seed, round_, partition_id, "fault"))
        if rng.random() >= self.fraction:
            return None
        return self.kinds[int(rng.integers(len(self.kinds)))]

    def mod(self) -> Mod:
        """Return the Flower mod that makes this plan's clients misbehave."""

        def fault_injection(
            message: Message, context: Context, call_next: ClientAppCallable
        ) -> Message:
            if message.metadata.message_type.partition(".")[0] != "train":
                return call_next(message, context)
            config = records_of(message.content, ConfigRecord).get(keys.CONFIG, ConfigRecord())
            round_ = config_number(config, keys.SERVER_ROUND, int, 0)
            kind = self.fault_for(round_, int(context.node_config[keys.PARTITION_ID]))
            if kind == "raise":
                raise InjectedFault(f"injected fault in round {round_}")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                time.sleep(self.hang_s)
            reply = call_next(message, context)
            if kind in (None, "hang") or reply.has_error():
                return reply
            return Message(_corrupted(reply.content, kind), reply_to=message)

        return fault_injection


def _corrupted(content: RecordDict, kind: str) -> RecordDict:
    """Return ``content`` with its model record (or first ArrayRecord) corrupted by ``kind``."""
    arrays = records_of(content, ArrayRecord)
    if not arrays:
        return content
    name = keys.ARRAYS if keys.ARRAYS in arrays else next(iter(arrays))
    values = {k: np.array(a.numpy()) for k, a in arrays[name].items()}  # copies
    first = next(iter(values))
    if kind in ("nan", "inf"):
        values[first].reshape(-1)[0] = np.nan if kind == "nan" else np.inf
    elif kind == "shape":
        values[first] = values[first].reshape(-1)[:-1]
    elif kind == "dtype":
        values[first] = values[first].astype(np.float64)
    elif kind == "huge":
        size = sum(v.size for v in values.values())
        values["padding"] = np.zeros(HUGE_FACTOR * size, dtype=np.float32)
    elif kind == "missing":
        del values[next(reversed(values))]
    return RecordDict({**content, name: to_array_record(values)})
