"""The methods. Each built-in is one module (or package) of this folder and registers itself; they
are imported on the first lookup in :data:`METHODS`, so importing this package is cheap."""

from .base import DEFAULT_ORDER, Generation, Intervention, MethodConfig, Stage, param, resolve_layers
from .contrastive import ContrastConfig, ContrastiveMethod, LinearContrastConfig
from .registry import (
    ENTRY_POINT_GROUP,
    METHODS,
    NONE,
    PLUGINS_ENV,
    build_methods,
    format_spec,
    method_fields,
    parse_spec,
    parse_value,
    register_method,
)

__all__ = ["DEFAULT_ORDER", "ENTRY_POINT_GROUP", "METHODS", "NONE", "PLUGINS_ENV", "ContrastConfig", "ContrastiveMethod",
           "Generation", "Intervention", "LinearContrastConfig", "MethodConfig", "Stage", "build_methods", "format_spec",
           "method_fields", "param", "parse_spec", "parse_value", "register_method", "resolve_layers"]
