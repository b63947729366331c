"""The methods, registered by name in :data:`METHODS` (importing this package registers them)."""

from .base import METHODS, NONE, ORDER, Intervention, MethodConfig, build_methods, register, split_methods
from . import act, carve, var, vhr  # noqa: E402,F401 - each module registers its method

__all__ = ["METHODS", "NONE", "ORDER", "Intervention", "MethodConfig", "build_methods", "register", "split_methods"]
