"""The built-in benchmarks, one module each; every module here is imported, and its bench registered,
on the first lookup of :data:`lvlm_fix.evals.bench.BENCHES`."""
