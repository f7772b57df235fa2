"""A population of simulated nodes that costs memory only for the state they keep."""

from collections.abc import Sequence
from typing import Any

from flwr.app import Context, RecordDict, UserConfig

from fedsim import keys

# Flower's server uses node id 1 (SUPERLINK_NODE_ID) and 0 means "no node", so
# simulated nodes start at 2; partition ids are the node ids shifted to start at 0.
FIRST_NODE_ID = 2


class NodeRegistry:
    """Node ids and per-node ``Context.state`` for a simulated population.

    Ids are a ``range``, and a node's ``Context`` is built for each call from its
    ids and the state it kept. Only a non-empty ``state`` outlives the call
    (:meth:`keep`): that is what lets clients keep control variates or optimizer
    moments across rounds, while a stateless client (FedAvg's) costs nothing
    between its rounds. A million-node population thus holds memory in proportion
    to the nodes with state, not to the nodes ever sampled.
    """

    def __init__(self, num_nodes: int, *, run_id: int, run_config: UserConfig) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.node_ids: Sequence[int] = range(FIRST_NODE_ID, FIRST_NODE_ID + num_nodes)
        self._run_id = run_id
        self._run_config = run_config
        self._states: dict[int, RecordDict] = {}

    def __len__(self) -> int:
        return len(self.node_ids)

    def partition_id(self, node_id: int) -> int:
        """Return the data partition a node reads, as Flower's simulation assigns it."""
        if node_id not in self.node_ids:
            raise KeyError(f"node {node_id} is not in this population")
        return node_id - FIRST_NODE_ID

    def context(self, node_id: int) -> Context:
        """Return the node's context for one call, holding the state it kept so far.

        Hand the context's ``state`` back to :meth:`keep` when the call is done.
        """
        node_config: UserConfig = {
            keys.PARTITION_ID: self.partition_id(node_id),
            keys.NUM_PARTITIONS: len(self.node_ids),
        }
        return Context(
            run_id=self._run_id,
            node_id=node_id,
            node_config=node_config,
            state=self._states.get(node_id, RecordDict()),
            run_config=self._run_config,
        )

    def keep(self, node_id: int, state: RecordDict) -> None:
        """Keep a node's ``Context.state`` after a call; an empty one is forgotten."""
        if len(state):
            self._states[node_id] = state
        else:
            self._states.pop(node_id, None)

    def state_dict(self) -> dict[str, Any]:
        """Return every node's kept ``Context.state`` (for checkpoints)."""
        return {"states": dict(self._states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the nodes' ``Context.state`` from :meth:`state_dict`."""
        self._states.clear()
        for node_id, node_state in state["states"].items():
            self.keep(node_id, node_state)

    @property
    def num_with_state(self) -> int:
        """How many nodes keep a state between calls (for tests and reports)."""
        return len(self._states)
