"""Bridges to other tools. Each module imports its tool itself; importing this package imports none."""
