"""The built-in benchmarks, one module each; every module here is registered on first use of
:func:`lvlm_fix.evals.bench.registry`."""
