"""Standard errors of the eval scores, and the paired difference of two models on the same items.

A retrieval score is a mean over queries, so its standard error is that of a mean:
``stdev(per-query scores, ddof=1) / sqrt(n)``. kNN accuracy is a proportion of the ``n`` rows scored
(every row once across the folds): ``sqrt(p (1 - p) / n)``. Two models scored on the same queries
differ by the mean of the per-query differences, whose standard error is
``stdev(differences, ddof=1) / sqrt(n)``: much smaller than either score's when the models find
the same queries hard, so a gain of more than twice it is unlikely to be the queries' luck.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def se_mean(values: Sequence[float]) -> float | None:
    """The standard error of the mean of ``values`` (None under two values)."""
    if len(values) < 2:
        return None
    return statistics.stdev(values) / math.sqrt(len(values))


def se_proportion(p: float, n: int) -> float | None:
    """The standard error of a proportion ``p`` of ``n`` trials (None without trials)."""
    return math.sqrt(p * (1 - p) / n) if n else None


def paired_difference(scores: dict[str, float], base: dict[str, float]) -> dict[str, float | int | None]:
    """``{"difference", "se", "n"}``: the mean of ``scores[i] - base[i]`` over the items both hold
    (``{item id: score}``) and its paired standard error; the difference is None without common items."""
    d = [scores[i] - base[i] for i in scores if i in base]
    return {"difference": statistics.fmean(d) if d else None, "se": se_mean(d), "n": len(d)}


def with_se(value: float, se: float | None, scale: float = 1.0, digits: int = 4) -> str:
    """``value ± se``, both times ``scale`` with ``digits`` decimals (the value alone without a se)."""
    shown = f"{scale * value:.{digits}f}"
    return shown if se is None else f"{shown} ± {scale * se:.{digits}f}"


def signed_with_se(value: float, se: float | None, scale: float = 1.0, digits: int = 4) -> str:
    """A difference with its sign: ``+value ± se`` (the value alone without a se)."""
    shown = f"{scale * value:+.{digits}f}"
    return shown if se is None else f"{shown} ± {scale * se:.{digits}f}"
