"""The built-in fake of the RunComfy Model API (see server.py)."""

from .faults import FaultConfig
from .server import SimConfig, Simulator, serve

__all__ = ["FaultConfig", "SimConfig", "Simulator", "serve"]
