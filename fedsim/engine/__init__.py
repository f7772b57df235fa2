"""Engines: implementations of Flower's ``Grid`` that run ClientApps in simulation."""

from fedsim.engine.inline import InlineGrid
from fedsim.engine.nodes import NodeRegistry

__all__ = ["InlineGrid", "NodeRegistry"]
