"""Small statistics for experiment reports: mean and standard error, paired t-test, regression.

Pure Python (no scipy at run time); the tests check these against scipy as an oracle.
"""

from __future__ import annotations

import math


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample sd / sqrt(n)); SE is NaN for n < 2."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n < 2:
        return m, math.nan
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(a: list[float], b: list[float]) -> tuple[float, float]:
    """(t, two-sided p) for mean(a - b) != 0 over paired samples; NaN when n < 2."""
    if len(a) != len(b):
        raise ValueError("paired samples must have equal length")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    m, se = mean_se(diffs)
    if se == 0:
        return (math.inf if m > 0 else -math.inf if m < 0 else math.nan), (0.0 if m != 0 else 1.0)
    t = m / se
    return t, t_two_sided_p(t, n - 1)


def linear_fit(x: list[float], y: list[float]) -> dict:
    """Least squares y = slope*x + intercept, Pearson r and the two-sided p-value of r != 0."""
    n = len(x)
    if n < 3:
        return {"n": n, "slope": math.nan, "intercept": math.nan, "r": math.nan, "p": math.nan}
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((v - mx) ** 2 for v in x)
    syy = sum((v - my) ** 2 for v in y)
    sxy = sum((u - mx) * (v - my) for u, v in zip(x, y))
    if sxx == 0 or syy == 0:
        return {"n": n, "slope": math.nan, "intercept": math.nan, "r": math.nan, "p": math.nan}
    r = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    t = math.inf if abs(r) == 1 else r * math.sqrt((n - 2) / (1 - r * r))
    return {"n": n, "slope": sxy / sxx, "intercept": my - sxy / sxx * mx, "r": r, "p": t_two_sided_p(t, n - 2)}
