"""A federated next-character dataset that ships with Python: its documentation topics.

Every CPython installation carries ``pydoc_data.topics``, the text ``help()`` shows for
each of the language reference's topics (``"assert"``, ``"class"``, ``"for"``, ...):
79 sections, about 465,000 characters, in Python 3.11. Each topic is a client, the
natural split of a text by section, as LEAF splits Shakespeare by speaking role
(Caldas et al. 2018): clients differ in vocabulary and length (202 to 62,522
characters), as real users' texts do.

A sample is a window of :data:`WINDOW` characters and its target is the character that
follows it (LEAF's next-character task). Windows do not overlap. The last
``test_fraction`` of each topic's windows go to the shared test split, so a test
window never overlaps a train window. Characters are ids into :data:`VOCABULARY`
(``string.printable``); id 0 stands for any other character.
"""

import string

import numpy as np
import torch

from fedsim.data.datasets import CentralDataset, DatasetUnavailableError

VOCABULARY = string.printable
WINDOW = 80  # characters per sample, the FedAvg paper's unroll length
_IDS = {char: i + 1 for i, char in enumerate(VOCABULARY)}  # 0: out of vocabulary


def topics() -> dict[str, str]:
    """Return the documentation topics of the running Python, by name."""
    try:
        from pydoc_data.topics import topics as text_by_topic
    except ImportError as err:  # some distributions split the standard library's docs off
        raise DatasetUnavailableError(
            "dataset 'pydocs' needs the standard library's pydoc_data package, which this "
            "Python installation lacks (some distributions ship it separately)"
        ) from err

    return dict(sorted(text_by_topic.items()))


def encode(text: str) -> np.ndarray:
    """Character ids of ``text`` (int64), 0 for characters outside :data:`VOCABULARY`."""
    return np.fromiter((_IDS.get(char, 0) for char in text), dtype=np.int64, count=len(text))


def windows(ids: np.ndarray, window: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``ids`` into non-overlapping windows and the id after each: ``(n, window)``, ``(n,)``."""
    count = (len(ids) - 1) // window
    starts = np.arange(count) * window
    inputs = ids[starts[:, None] + np.arange(window)]  # (n, window)
    return inputs, ids[starts + window]


def load_pydocs(
    *, num_clients: int, test_fraction: float = 0.2
) -> tuple[CentralDataset, list[np.ndarray]]:
    """Load the topics as a ``"next-token"`` dataset and its natural split over clients.

    With fewer clients than topics, client ``i`` gets topics ``i``, ``i + num_clients``,
    ... in name order. Returns the pooled dataset and each client's train indices.
    """
    texts = list(topics().values())
    if not 1 <= num_clients <= len(texts):
        raise ValueError(
            f"data.num_clients = {num_clients}: the 'pydocs' dataset has {len(texts)} "
            "topics, one or more per client"
        )
    train_x, train_y, test_x, test_y = [], [], [], []
    owners = []  # the client of each train window
    for topic, text in enumerate(texts):
        inputs, targets = windows(encode(text))
        n_train = len(inputs) - int(test_fraction * len(inputs))
        train_x.append(inputs[:n_train])
        train_y.append(targets[:n_train])
        test_x.append(inputs[n_train:])
        test_y.append(targets[n_train:])
        owners.append(np.full(n_train, topic % num_clients))
    owner = np.concatenate(owners)
    central = CentralDataset(
        train_x=torch.from_numpy(np.concatenate(train_x)),
        train_y=torch.from_numpy(np.concatenate(train_y)),
        test_x=torch.from_numpy(np.concatenate(test_x)),
        test_y=torch.from_numpy(np.concatenate(test_y)),
        num_classes=len(VOCABULARY) + 1,
        task="next-token",
    )
    return central, [np.flatnonzero(owner == client) for client in range(num_clients)]
