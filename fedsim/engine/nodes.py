"""A population of simulated nodes whose state exists only once touched."""

from collections.abc import Sequence
from typing import Any

from flwr.app import Context, RecordDict, UserConfig

from fedsim import keys

# Flower's server uses node id 1 (SUPERLINK_NODE_ID) and 0 means "no node", so
# simulated nodes start at 2; partition ids are the node ids shifted to start at 0.
FIRST_NODE_ID = 2


class NodeRegistry:
    """Node ids and per-node ``Context`` for a simulated population.

    Ids are a ``range`` and contexts are created on first use, so a population of
    a million nodes costs a few bytes until nodes are sampled; a context then lives
    for the whole run, which is what lets clients keep state across rounds
    (control variates, optimizer moments) in ``Context.state``.
    """

    def __init__(self, num_nodes: int, *, run_id: int, run_config: UserConfig) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.node_ids: Sequence[int] = range(FIRST_NODE_ID, FIRST_NODE_ID + num_nodes)
        self._run_id = run_id
        self._run_config = run_config
        self._contexts: dict[int, Context] = {}

    def __len__(self) -> int:
        return len(self.node_ids)

    def partition_id(self, node_id: int) -> int:
        """Return the data partition a node reads, as Flower's simulation assigns it."""
        if node_id not in self.node_ids:
            raise KeyError(f"node {node_id} is not in this population")
        return node_id - FIRST_NODE_ID

    def context(self, node_id: int) -> Context:
        """Return the node's context, creating it on first use."""
        context = self._contexts.get(node_id)
        if context is None:
            node_config: UserConfig = {
                keys.PARTITION_ID: self.partition_id(node_id),
                keys.NUM_PARTITIONS: len(self.node_ids),
            }
            context = Context(
                run_id=self._run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=self._run_config,
            )
            self._contexts[node_id] = context
        return context

    def state_dict(self) -> dict[str, Any]:
        """Return every materialized node's ``Context.state`` (for checkpoints)."""
        return {"states": {node_id: c.state for node_id, c in self._contexts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the nodes' ``Context.state`` from :meth:`state_dict`."""
        for node_id, node_state in state["states"].items():
            self.context(node_id).state = node_state

    @property
    def num_materialized(self) -> int:
        """How many nodes have a context so far (for tests and reports)."""
        return len(self._contexts)
