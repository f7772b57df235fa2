"""Seeds derived from ``(root seed, round, node, purpose)``.

Every random choice in a run (cohort sampling, model initialization, a client's
data shuffling and dropout) draws from a generator keyed by *what it is for*,
never from a global RNG. Any round or client therefore replays in isolation, and
the result does not depend on the order in which an engine happens to execute
clients (the idea of FedJAX's client samplers).
"""

import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

# Node 0 is never a client id in fedsim's engines; server-side draws use it.
SERVER_NODE = 0

Built = TypeVar("Built")
#: Hold it while drawing from torch's global CPU generator in a threads-engine worker
#: (building a model draws its initial weights): another worker may be inside
#: :func:`built_from_seed`, whose seeded stream any draw in between would shift.
GLOBAL_RNG_LOCK = threading.Lock()


def derive_seed(root: int, round_: int, node: int, purpose: str) -> int:
    """Return a 63-bit seed unique to ``(root, round_, node, purpose)``.

    ``SeedSequence`` hashes its entropy words thoroughly, so neighbouring rounds
    or nodes give unrelated streams; the purpose string is folded in with CRC32,
    which is stable across processes (unlike Python's salted ``hash``).
    """
    words = [root, round_, node, zlib.crc32(purpose.encode())]
    if any(w < 0 for w in words):
        raise ValueError(f"seed components must be non-negative, got {words[:3]}")
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def numpy_rng(root: int, round_: int, node: int, purpose: str) -> np.random.Generator:
    """Return a NumPy generator for one purpose of one node in one round."""
    return np.random.default_rng(derive_seed(root, round_, node, purpose))


def torch_generator(root: int, round_: int, node: int, purpose: str) -> torch.Generator:
    """Return a CPU ``torch.Generator`` for one purpose of one node in one round."""
    return torch.Generator().manual_seed(derive_seed(root, round_, node, purpose))


@contextmanager
def seeded_torch_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with torch's global RNG of ``device`` seeded, then restore it.

    Dropout and other in-model randomness draw from torch's global generators.
    Seeding only the ones ``device`` uses matters for speed: ``torch.manual_seed``
    also queues lazy seeding for CUDA and MTIA, capturing a stack trace each time,
    which costs more per client than a small model's optimizer step.
    """
    on_cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_cuda else []):
        torch.default_generator.manual_seed(seed)
        if on_cuda:
            torch.cuda.default_generators[device.index or 0].manual_seed(seed)
        yield


def built_from_seed(seed: int, build: Callable[[], Built]) -> Built:
    """Return ``build()`` run with torch's global CPU generator seeded, then restored.

    Module constructors draw their initial weights (and spectral norm its start
    vectors) from torch's global generator, which the threads engine's workers
    share: the lock keeps two workers' seeded constructions from interleaving, so
    a node's model is the same on every engine.
    """
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
