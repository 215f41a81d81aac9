"""Rounds of one measure printed with their spread (every round, best, median) and ratios taken both
best-to-best and median-to-median: on a shared machine one figure alone says little, and a comparison
that shows only the peer's worst round misleads us first."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def best(values: Sequence[float | None], higher: bool) -> float | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    return max(got) if higher else min(got)


def median(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def spread_table(title: str, unit: str, series: dict[str, Sequence[float | None]], higher: bool) -> str:
    """A markdown table: one row per server, its figure in each round, best and median."""
    rounds = max((len(v) for v in series.values()), default=0)
    head = (
        f"| {title} ({unit}) | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " | best | median |"
    )
    rows = [head, "|---" * (rounds + 3) + "|"]
    for label, values in series.items():
        cells = [_num(v) for v in values] + ["-"] * (rounds - len(values))
        rows.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {_num(best(values, higher))} | {_num(median(values))} |"
        )
    return "\n".join(rows)


def ratio_lines(
    what: str, ours: str, series: dict[str, Sequence[float | None]], higher: bool, peers: Sequence[str]
) -> list[str]:
    """'ours/peer' for each peer, best-to-best and median-to-median."""
    lines = []
    for peer in peers:
        if peer not in series or ours not in series:
            continue
        b = ratio(best(series[ours], higher), best(series[peer], higher))
        m = ratio(median(series[ours]), median(series[peer]))
        lines.append(f"{what}: {ours}/{peer} = {b} (best/best), {m} (median/median)")
    return lines
