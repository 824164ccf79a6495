"""The issues' performance targets as checks over measurements, each giving a ``Verdict``.

A target whose measurements are missing or failed is "not measured", with the reason; it is
never counted as met.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.measure import Measurement
from bench.report import Verdict

Judge = Callable[[Measurement, Measurement], tuple[bool, str]]


def faster(
    target: str, fast: Measurement | None, slow: Measurement | None, *, at_least: float
) -> Verdict:
    """``fast`` must take at most 1/``at_least`` of ``slow``'s wall time."""

    def judge(f: Measurement, s: Measurement) -> tuple[bool, str]:
        ratio = s.wall_s / f.wall_s
        return ratio >= at_least, f"{ratio:.2f}x ({_walls(f, s)})"

    return _verdict(target, fast, slow, judge)


def leaner(target: str, lean: Measurement | None, reference: Measurement | None) -> Verdict:
    """``lean``'s peak RSS must not exceed ``reference``'s (both at the floor: equal)."""

    def judge(m: Measurement, r: Measurement) -> tuple[bool, str]:
        if m.at_floor and r.at_floor:
            return True, f"both at the method's floor ({m.floor_mib:.1f} MiB)"
        shown = f"{m.max_rss_mib:,.1f} MiB vs {r.label} {r.max_rss_mib:,.1f} MiB"
        return m.max_rss_mib <= r.max_rss_mib, shown

    return _verdict(target, lean, reference, judge)


def within(
    target: str, subject: Measurement | None, limit: Measurement | None, *, tolerance: float
) -> Verdict:
    """``subject`` may take at most (1 + tolerance) times ``limit``'s wall time."""

    def judge(m: Measurement, limit: Measurement) -> tuple[bool, str]:
        excess = m.wall_s / limit.wall_s - 1
        return excess <= tolerance, f"{excess:+.0%} ({_walls(m, limit)})"

    return _verdict(target, subject, limit, judge)


def not_measured(target: str, reason: str) -> Verdict:
    return Verdict(target, reason, "not measured")


def _verdict(target: str, a: Measurement | None, b: Measurement | None, judge: Judge) -> Verdict:
    for m in (a, b):
        if m is None:
            return not_measured(target, "not run")
        if not m.ok:
            return not_measured(target, f"{m.label} failed (exit {_codes(m)})")
    assert a is not None and b is not None
    met, shown = judge(a, b)
    return Verdict(target, shown, "met" if met else "missed")


def _walls(a: Measurement, b: Measurement) -> str:
    return f"{a.label} {a.wall_s:.2f} s vs {b.label} {b.wall_s:.2f} s"


def _codes(m: Measurement) -> str:
    return ", ".join(map(str, m.exit_codes))
