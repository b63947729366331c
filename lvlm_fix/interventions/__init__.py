"""The methods, registered by name in :data:`METHODS` (importing this package registers them)."""

from .base import METHODS, NONE, ORDER, Intervention, MethodConfig, build_methods, register, split_methods

__all__ = ["METHODS", "NONE", "ORDER", "Intervention", "MethodConfig", "build_methods", "register", "split_methods"]
