"""The serving benchmark's figures: rounds and shapes merged to their best, and the tables printed."""

from __future__ import annotations

from _spread import ratio_lines, spread_table

CONCURRENCY = (1, 8, 32)
TARGETS = {"c8": 0.98, "c1_p50": 1.05}  # ResNet34 c=8 >= 0.98x bare; c=1 p50 <= 1.05x bare


MEMORY = [  # (label, key): the three sums a MemorySampler reports
    ("PSS sum", "pss_total_mb"),
    ("resident, shared pages once", "resident_once_mb"),
    ("RSS sum", "rss_total_mb"),
]
NOT_MEASURES = {"codes", "pids", "ready_workers"}


def merge_rounds(rounds: list[dict]) -> dict:
    """Best of each measure across rounds (or shapes), by what the measure's name says is better."""

    def walk(values: list, key: object) -> object:
        if key in NOT_MEASURES:
            return values[0]
        if isinstance(values[0], dict):
            return {k: walk([v[k] for v in values if k in v], k) for k in values[0]}
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not numbers or any(v is not None and v not in numbers for v in values):
            return values[0]  # not a measure (a missing figure counts as no figure, not as the best)
        return max(numbers) if str(key).endswith("per_s") or key == "errors" else min(numbers)

    return walk(rounds, "")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def fmt(v: float | None, unit: str) -> str:
    return f"{v:,.1f} {unit}" if v is not None else "n/a"


# The bare figure a server at c=8 is held to: as many images in flight as its 8 clients keep
# (``_bare.in_flight``); runs from before it have only "batched".
IN_FLIGHT = "in_flight/img_per_s"


def pick(side: dict, path: str) -> float | None:
    """A figure by its path ('resnet34/c8/req_per_s'); None where the run has no such figure."""
    for part in path.split("/"):
        if not isinstance(side, dict) or part not in side:
            return None
        side = side[part]
    return side if isinstance(side, (int, float)) else None


# (label, bare path or None, server path, unit); bare paths are in a bare run, server paths in a server's
ROWS = [
    ("ResNet34 c=1 p50 latency", "batch1/p50_ms", "resnet34/c1/p50_ms", "ms"),
    ("ResNet34 c=1 p99 latency", "batch1/p99_ms", "resnet34/c1/p99_ms", "ms"),
    *[
        (
            f"ResNet34 c={c} throughput",
            "batched/img_per_s" if c > 1 else "batch1/img_per_s",
            f"resnet34/c{c}/req_per_s",
            "img/s",
        )
        for c in CONCURRENCY
    ],
    *[
        (f"ResNet34 c={c} {p} latency", None, f"resnet34/c{c}/{p}_ms", "ms")
        for c in (8, 32)
        for p in ("p50", "p99")
    ],
    *[
        row
        for c in CONCURRENCY
        for row in (
            (
                f"tiny c={c} throughput",
                "tiny/req_per_s" if c == 32 else None,
                f"tiny/c{c}/req_per_s",
                "req/s",
            ),
            (f"tiny c={c} p50 latency", None, f"tiny/c{c}/p50_ms", "ms"),
        )
    ],
    *[
        (
            f"{name} memory, {label} (peak)",
            f"memory/{key}" if name == "resnet34" else None,
            f"{name}/memory/{key}",
            "MB",
        )
        for name in ("resnet34", "tiny")
        for label, key in MEMORY
    ],
    *[
        (f"{name} start-up to first prediction", None, f"{name}/startup_s", "s")
        for name in ("resnet34", "tiny")
    ],
]


def report(results: dict) -> str:
    """docs/benchmarks.md's table: each measure for the bare model, ours and TorchServe, and the ratios."""
    bare, ours, ts = results["bare"], results["ours"], results.get("torchserve") or {}
    rows = [
        "| measure | bare model | ours | TorchServe 0.12 | ours/bare | TorchServe/bare | ours/TorchServe |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, bare_path, path, unit in ROWS:
        b = pick(bare, bare_path) if bare_path else None
        o, t = pick(ours, path), pick(ts, path)
        if b is None and o is None and t is None:
            continue
        rows.append(
            f"| {label} | {fmt(b, unit)} | {fmt(o, unit)} | {fmt(t, unit)} | {ratio(o, b)} | {ratio(t, b)} "
            f"| {ratio(o, t)} |"
        )
    return "\n".join(rows)


def report_shapes(results: dict) -> str:
    """Each shape on its own: the bare model's and ours, beside each TorchServe setup."""
    bare_names, ours_names = list(results["bare_shapes"]), list(results["ours_shapes"])
    ts_setups = merge_ts_setups(results)
    head = [f"bare {s}" for s in bare_names] + [f"ours {s}" for s in ours_names] + list(ts_setups)
    rows = ["| measure | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for label, bare_path, path, unit in ROWS:
        values = [pick(results["bare_shapes"][s], bare_path) if bare_path else None for s in bare_names]
        values += [pick(results["ours_shapes"][s], path) for s in ours_names]
        values += [pick(side, path) for side in ts_setups.values()]
        if any(v is not None for v in values):
            rows.append(f"| {label} | " + " | ".join(fmt(v, unit) for v in values) + " |")
    return "\n".join(rows)


def merge_ts_setups(results: dict) -> dict:
    """Each TorchServe setup's best round."""
    rounds = results.get("rounds") or []
    labels = rounds[0].get("ts_setups", {}) if rounds else {}
    return {label: merge_rounds([r["ts_setups"][label] for r in rounds]) for label in labels}


def report_memory(results: dict) -> str:
    """Peak PSS and RSS of every process, and the sums (each process's own peak; a sum at one instant).
    The last column counts each physical page once across the run's processes (one process: its RSS)."""
    rows = [
        "| run | process | PSS (peak) | RSS (peak) | resident, shared pages once |",
        "|---|---|---|---|---|",
    ]
    runs = [(f"bare {s} (ResNet34 + tiny)", r.get("memory")) for s, r in results["bare_shapes"].items()]
    for shape, side in results["ours_shapes"].items():
        runs += [(f"ours {shape} {name}", side[name].get("memory")) for name in side]
    for name, side in (results.get("torchserve") or {}).items():
        runs.append((f"TorchServe {name}", side.get("memory")))
    for run, mem in runs:
        for role, m in (mem or {}).get("processes", {}).items():
            rows.append(f"| {run} | {role} | {fmt(m['pss_mb'], 'MB')} | {fmt(m['rss_mb'], 'MB')} | |")
        if mem:
            pss, rss, once = (fmt(mem[k], "MB") for k in ("pss_total_mb", "rss_total_mb", "resident_once_mb"))
            rows.append(f"| {run} | **all** | {pss} | {rss} | {once} |")
    return "\n".join(rows)


def report_targets(results: dict) -> str:
    """The acceptance targets, against the best bare shape; for each of our shapes and the best."""

    def best(sides: dict, path: str, higher: bool) -> tuple[float | None, str]:
        found = [(pick(side, path), shape) for shape, side in sides.items() if pick(side, path) is not None]
        if not found:
            return None, "-"
        return (max if higher else min)(found)

    # c=8 against the bare model with as many images in flight (8: 2 processes x 4), and, stricter,
    # against a batch of 8 in every process (16 in flight): both are printed
    bare_c8, bare_c8_shape = best(results["bare_shapes"], IN_FLIGHT, True)
    strict_c8, strict_shape = best(results["bare_shapes"], "batched/img_per_s", True)
    if bare_c8 is None:  # a run from before the in-flight measure
        bare_c8, bare_c8_shape = strict_c8, strict_shape
    bare_p50, bare_p50_shape = best(results["bare_shapes"], "batch1/p50_ms", False)
    lines = [
        f"bare model limit: c=8 {fmt(bare_c8, 'img/s')} ({bare_c8_shape}, 8 images in flight), "
        f"{fmt(strict_c8, 'img/s')} with a batch of 8 in every process ({strict_shape}); c=1 p50 "
        f"{fmt(bare_p50, 'ms')} ({bare_p50_shape})"
    ]
    sides = {**{f"ours {s}": v for s, v in results["ours_shapes"].items()}}
    if results.get("torchserve"):
        sides["TorchServe"] = results["torchserve"]
    for label, side in sides.items():
        c8, p50 = pick(side, "resnet34/c8/req_per_s"), pick(side, "resnet34/c1/p50_ms")
        r8 = c8 / bare_c8 if c8 and bare_c8 else None
        r1 = p50 / bare_p50 if p50 and bare_p50 else None
        both = "yes" if r8 and r1 and r8 >= TARGETS["c8"] and r1 <= TARGETS["c1_p50"] else "no"
        same = results["bare_shapes"].get(label.removeprefix("ours "))
        alike = (
            f" (against the bare model in the same shape: c=8 {ratio(c8, pick(same, IN_FLIGHT))},"
            f" c=1 p50 {ratio(p50, pick(same, 'batch1/p50_ms'))})"
            if same and label.startswith("ours ")
            else ""
        )
        lines.append(
            f"{label}: c=8 {fmt(c8, 'img/s')} = {ratio(c8, bare_c8)} bare, c=1 p50 {fmt(p50, 'ms')} = "
            f"{ratio(p50, bare_p50)} bare{alike}; both targets with this one setting: {both}"
        )
    ours_c8, c8_shape = best(results["ours_shapes"], "resnet34/c8/req_per_s", True)
    ours_p50, p50_shape = best(results["ours_shapes"], "resnet34/c1/p50_ms", False)
    met8 = bool(ours_c8 and bare_c8 and ours_c8 / bare_c8 >= TARGETS["c8"])
    met1 = bool(ours_p50 and bare_p50 and ours_p50 / bare_p50 <= TARGETS["c1_p50"])
    lines.append(
        f"TARGET ResNet34 c=8 throughput >= {TARGETS['c8']}x bare: {ratio(ours_c8, bare_c8)} "
        f"(ours {c8_shape}; bare {bare_c8_shape} with 8 images in flight): {'met' if met8 else 'MISSED'}; "
        f"{ratio(ours_c8, strict_c8)} the bare {strict_shape} with a batch of 8 in every process"
    )
    lines.append(
        f"TARGET ResNet34 c=1 p50 latency <= {TARGETS['c1_p50']}x bare: {ratio(ours_p50, bare_p50)} "
        f"(ours {p50_shape}): {'met' if met1 else 'MISSED'}"
    )
    return "\n".join(lines)


def spread(rounds: list[dict], names: list[str]) -> str:
    """Every round's figure, best and median, for the measures the targets use, per side and shape."""
    measures = [  # (title, unit, higher is better, path in a bare shape, path in a server run)
        ("ResNet34 c=1 p50", "ms", False, "batch1/p50_ms", "resnet34/c1/p50_ms"),
        ("ResNet34 c=8", "img/s", True, IN_FLIGHT, "resnet34/c8/req_per_s"),
        ("tiny c=32", "req/s", True, None, "tiny/c32/req_per_s"),
    ]
    parts = []
    for title, unit, higher, bare_path, path in measures:
        if path.split("/")[0] not in names:
            continue
        series: dict[str, list] = {}
        if bare_path:
            for shape in rounds[0]["bare_shapes"]:
                series[f"bare {shape}"] = [pick(r["bare_shapes"][shape], bare_path) for r in rounds]
        for shape in rounds[0]["ours_shapes"]:
            series[f"ours {shape}"] = [pick(r["ours_shapes"][shape], path) for r in rounds]
        for label in rounds[0].get("ts_setups", {}):
            series[label] = [pick(r["ts_setups"][label], path) for r in rounds]
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        parts.append(spread_table(title, unit, series, higher))
        peers = [k for k in series if k.startswith(("bare", "torchserve"))]
        for ours_label in [k for k in series if k.startswith("ours")]:
            parts += ratio_lines(title, ours_label, series, higher, peers)
        parts.append("")
    return "\n".join(parts)
