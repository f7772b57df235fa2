"""Engines: implementations of Flower's ``Grid`` that run ClientApps in simulation.

Every engine is exported here. ``RayGrid`` and ``RayResources`` load Ray, and
``ThreadedGrid`` cloudpickle, on first use (PEP 562), so ``import fedsim.engine``
stays light for a run that needs neither.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fedsim.engine.inline import InlineGrid
from fedsim.engine.nodes import NodeRegistry
from fedsim.engine.replies import StreamingGrid, StreamingStrategy, in_node_order
from fedsim.engine.simulated import SimulatedGrid

if TYPE_CHECKING:
    from fedsim.engine.heterogeneity import HeterogeneousGrid
    from fedsim.engine.ray_grid import RayGrid, RayResources
    from fedsim.engine.threaded import ThreadedGrid
    from fedsim.engine.vmap import VmapGrid

_LAZY = {
    "HeterogeneousGrid": "heterogeneity",
    "RayGrid": "ray_grid",
    "RayResources": "ray_grid",
    "ThreadedGrid": "threaded",
    "VmapGrid": "vmap",
}

__all__ = [
    "HeterogeneousGrid",
    "InlineGrid",
    "NodeRegistry",
    "RayGrid",
    "RayResources",
    "SimulatedGrid",
    "StreamingGrid",
    "StreamingStrategy",
    "ThreadedGrid",
    "VmapGrid",
    "in_node_order",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"fedsim.engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
