"""Bootstrap confidence intervals and paired bootstrap tests over evaluation samples.

Method (nonparametric bootstrap over samples, Efron & Tibshirani 1993):

* Draw ``n_boot`` replicates; each resamples the ``n`` samples with replacement, as a row of
  indices ``rng.integers(0, n, size=(n_boot, n))`` with ``rng = np.random.default_rng(seed)``.
  All index rows are drawn up front, so a seed fixes every replicate.
* :func:`bootstrap_ci` returns the percentile interval: the ``alpha/2`` and ``1 - alpha/2``
  quantiles (numpy's default linear interpolation) of the metric over the replicates.
* :func:`paired_bootstrap` evaluates two systems on the **same** samples, so each replicate uses
  one index row for both (the pairing cancels per-sample difficulty). With observed difference
  ``d = m(a) - m(b)`` and replicate differences ``d*``, the two-sided p-value tests "no
  difference" by centring the bootstrap distribution on zero:
  ``p = (1 + #{|d* - d| >= |d|}) / (n_boot + 1)``. The +1 terms keep p above 0, so the smallest
  reportable p is ``1 / (n_boot + 1)``.

Metrics are passed as functions of the resampled per-sample values, so accuracy, F1, CHAIR_S and
CHAIR_I (a ratio of sums) all fit; see ``STATS`` in :mod:`.pope` and :mod:`.chair`. To resample
something that is not an array, pass ``np.arange(n)`` as the values: the metric function then
receives the resampled index array itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

from lvlm_fix.errors import ConfigError

MetricFn = Callable[[np.ndarray], "float | np.ndarray"]

# With batched=True, resampled values are materialised a chunk of replicates at a time; this
# caps one chunk at about 2**24 elements (128 MiB of float64).
_MAX_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    alpha: float
    n_boot: int
    seed: int
    n: int
    method: str = "percentile bootstrap"

    def as_dict(self) -> dict[str, float | int | str]:
        """The fields as a plain dict (JSON-ready)."""
        return asdict(self)


@dataclass(frozen=True)
class PairedBootstrap:
    """Difference ``m(a) - m(b)`` on shared samples, its interval and two-sided p-value."""

    diff: float
    low: float
    high: float
    p_value: float
    alpha: float
    n_boot: int
    seed: int
    n: int
    method: str = "paired bootstrap"

    def as_dict(self) -> dict[str, float | int | str]:
        """The fields as a plain dict (JSON-ready)."""
        return asdict(self)


def p_text(p: float, n_boot: int = 1000) -> str:
    """A bootstrap p-value as printed: ``<0.001`` below what ``n_boot`` replicates resolve, else 3 decimals.

    The smallest p :func:`paired_bootstrap` returns is ``1 / (n_boot + 1)`` (0.000999 for 1,000), which
    means "smaller than the replicates can tell", not 0.000999: anything under ``1 / n_boot`` prints as
    ``<1/n_boot`` (``<0.001`` for 1,000, ``<0.0001`` for 10,000).
    """
    bound = 1 / max(int(n_boot), 1)
    if p < bound:
        return f"<{bound:g}"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.2g}"  # under 0.001 only with more than 1,000 replicates


def _as_samples(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 0 or len(array) == 0:
        raise ConfigError(f"{name} holds no samples; pass one value (or row) per evaluated sample")
    return array


def _check_settings(n_boot: int, alpha: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ConfigError(f"n_boot={n_boot!r} must be a positive integer; 1000 is customary")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha={alpha!r} must lie in (0, 1); 0.05 gives a 95% interval")


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(int(n_boot), n))


def _replicates(
    values: np.ndarray, metric_fn: MetricFn, idx: np.ndarray, batched: bool
) -> np.ndarray:
    """The metric on every resample; ``idx`` is ``(n_boot, n)``."""
    if not batched:
        # One call per replicate; fancy indexing resamples all n samples at once.
        return np.fromiter((float(metric_fn(values[row])) for row in idx), float, len(idx))
    per_replicate = max(1, values.size)
    step = max(1, _MAX_CHUNK_ELEMENTS // per_replicate)
    out = []
    for start in range(0, len(idx), step):
        chunk = idx[start : start + step]
        result = np.asarray(metric_fn(values[chunk]), dtype=float)
        if result.shape != (len(chunk),):
            raise ConfigError(
                f"with batched=True metric_fn must return one value per replicate, shape "
                f"({len(chunk)},), but returned shape {result.shape}; reduce only the sample axis"
            )
        out.append(result)
    return np.concatenate(out)


def bootstrap_ci(
    per_sample_values: ArrayLike,
    metric_fn: MetricFn,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    *,
    batched: bool = False,
) -> BootstrapCI:
    """Percentile bootstrap confidence interval of a metric over samples.

    Args:
        per_sample_values: One entry (scalar or row) per sample; the first axis is resampled.
        metric_fn: Maps resampled values (same shape as ``per_sample_values``) to a scalar. With
            ``batched=True`` it receives ``(k, n, ...)`` and must return ``k`` values.
        n_boot: Number of bootstrap replicates.
        seed: Seed of ``np.random.default_rng``.
        alpha: 1 - confidence level.
        batched: Evaluate many replicates per call (vectorised metric functions).

    Returns:
        The estimate on the full data with its ``[low, high]`` interval.

    Raises:
        ConfigError: For empty values, ``n_boot < 1``, ``alpha`` outside (0, 1), or a batched
            metric returning the wrong shape.
    """
    values = _as_samples(per_sample_values, "per_sample_values")
    _check_settings(n_boot, alpha)
    reps = _replicates(values, metric_fn, _indices(len(values), n_boot, seed), batched)
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(
        estimate=_full_metric(values, metric_fn, batched),
        low=float(low),
        high=float(high),
        alpha=alpha,
        n_boot=int(n_boot),
        seed=seed,
        n=len(values),
    )


def _full_metric(values: np.ndarray, metric_fn: MetricFn, batched: bool) -> float:
    if batched:
        return float(np.asarray(metric_fn(values[np.newaxis]), dtype=float).reshape(-1)[0])
    return float(metric_fn(values))


def paired_bootstrap(
    a_records: ArrayLike,
    b_records: ArrayLike,
    metric_fn: MetricFn,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    *,
    batched: bool = False,
) -> PairedBootstrap:
    """Paired bootstrap of the difference of a metric between two systems on the same samples.

    Args:
        a_records: Per-sample values of system A (e.g. the method).
        b_records: Per-sample values of system B (e.g. the baseline), aligned with A: row ``i``
            of both must be the same question or image.
        metric_fn: As in :func:`bootstrap_ci`.
        n_boot: Number of bootstrap replicates.
        seed: Seed of ``np.random.default_rng``.
        alpha: 1 - confidence level of the interval on the difference.
        batched: As in :func:`bootstrap_ci`.

    Returns:
        ``diff = m(a) - m(b)``, its percentile interval and the two-sided p-value described in
        the module docstring.

    Raises:
        ConfigError: If the two systems have different numbers of samples, or as
            :func:`bootstrap_ci`.
    """
    a = _as_samples(a_records, "a_records")
    b = _as_samples(b_records, "b_records")
    if len(a) != len(b):
        raise ConfigError(
            f"paired bootstrap needs the same samples for both systems, got {len(a)} and "
            f"{len(b)}; evaluate both on the same questions and align them by id"
        )
    _check_settings(n_boot, alpha)
    idx = _indices(len(a), n_boot, seed)  # one index row per replicate, shared by a and b
    diffs = _replicates(a, metric_fn, idx, batched) - _replicates(b, metric_fn, idx, batched)
    observed = _full_metric(a, metric_fn, batched) - _full_metric(b, metric_fn, batched)
    extreme = int(np.count_nonzero(np.abs(diffs - observed) >= abs(observed)))
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return PairedBootstrap(
        diff=observed,
        low=float(low),
        high=float(high),
        p_value=(1 + extreme) / (int(n_boot) + 1),
        alpha=alpha,
        n_boot=int(n_boot),
        seed=seed,
        n=len(a),
    )


def paired_bootstrap_p(
    a_records: ArrayLike,
    b_records: ArrayLike,
    metric_fn: MetricFn,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    batched: bool = False,
) -> float:
    """Two-sided paired-bootstrap p-value for ``m(a) != m(b)``; see :func:`paired_bootstrap`."""
    return paired_bootstrap(
        a_records, b_records, metric_fn, n_boot=n_boot, seed=seed, batched=batched
    ).p_value
