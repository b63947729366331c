"""The package version (one place: the root package, the run records and the ACT calibration file read it)."""

__version__ = "0.1.0"
