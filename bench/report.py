"""The printed table and the ratios, from the result records `bench.run` collects."""

from __future__ import annotations

from typing import Any

_COLUMNS = (
    ("scenario", "<", 34),
    ("conc", ">", 4),
    ("req/s", ">", 9),
    ("images/s", ">", 9),
    ("p50 ms", ">", 8),
    ("p99 ms", ">", 8),
    ("errors", "<", 16),
    ("cores srv/wrk/other", "<", 19),
)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(compute: list[dict[str, Any]], scenarios: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = []
    for c in compute:
        rows.append(
            (
                f"in-process encode, batch {c['batch']}",
                "-",
                _fmt(c["calls_per_s"], 0),
                _fmt(c["images_per_s"], 0),
                _fmt(c["p50_ms"], 2),
                _fmt(c["p99_ms"], 2),
                "-",
                f"{c['own_cores']:.2f}/-/{c['other_cores']:.2f}",
            )
        )
    for s in scenarios:
        w = s.get("wrk")
        if w is None:
            rows.append((s["label"], str(s["concurrency"]), "-", "-", "-", "-", s["outcome"], ""))
            continue
        cpu = s["cpu"]
        errors = w["error_text"]
        if s["outcome"] != "ok":
            errors = f"{errors} ({s['outcome']})"
        rows.append(
            (
                s["label"],
                str(s["concurrency"]),
                _fmt(w["rps"], 0),
                _fmt(s["images_per_s"], 0),
                _fmt(w["p50_ms"], 2),
                _fmt(w["p99_ms"], 2),
                errors,
                f"{cpu['server_cores']:.2f}/{cpu['wrk_cores']:.2f}/{cpu['other_cores']:.2f}",
            )
        )
    lines = [_row(tuple(name for name, _, _ in _COLUMNS))]
    lines.append("  ".join("-" * width for _, _, width in _COLUMNS))
    lines += [_row(r) for r in rows]
    return "\n".join(lines)


def _row(cells: tuple[str, ...]) -> str:
    out = [
        f"{cell:{align}{width}}" for cell, (_, align, width) in zip(cells, _COLUMNS, strict=True)
    ]
    return "  ".join(out).rstrip()


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratios(
    by_key: dict[str, dict[str, Any]],
    compute: dict[int, dict[str, Any]],
    memory: dict[str, Any] | None,
) -> dict[str, float | None]:
    """The headline ratios; None where a side was not measured (unsupported, skipped)."""

    def rps(key: str) -> float | None:
        s = by_key.get(key)
        return None if s is None or s.get("wrk") is None else float(s["wrk"]["rps"])

    def images(key: str) -> float | None:
        s = by_key.get(key)
        return None if s is None or s.get("wrk") is None else float(s["images_per_s"])

    def tail(key: str) -> float | None:
        s = by_key.get(key)
        if s is None or s.get("wrk") is None:
            return None
        return _ratio(s["wrk"]["p99_ms"], s["wrk"]["p50_ms"])

    batch = max(compute) if compute else None
    inproc = None if batch is None else float(compute[batch]["images_per_s"])
    return {
        "service_encode_c16_over_ceiling_c16_rps": _ratio(
            rps("service.encode.x1@16"), rps("ceiling.sink@16")
        ),
        "service_encode_c16_over_bare_c16_rps": _ratio(
            rps("service.encode.x1@16"), rps("bare.sink@16")
        ),
        "ceiling_c16_over_bare_c16_rps": _ratio(rps("ceiling.sink@16"), rps("bare.sink@16")),
        "service_encode_c16_over_baseline_c16_rps": _ratio(
            rps("service.encode.x1@16"), rps("baseline.encode.x1@16")
        ),
        "service_anomaly_c16_over_baseline_c16_rps": _ratio(
            rps("service.anomaly.x1"), rps("baseline.anomaly.x1")
        ),
        "service_encode_c16_over_naive_c16_rps": _ratio(
            rps("service.encode.x1@16"), rps("naive.encode.x1@16")
        ),
        "service_encode_c16_over_litserve_best_c16_rps": _ratio(
            rps("service.encode.x1@16"),
            _best(rps("litserve.encode.x1@16"), rps("litserve-batch.encode.x1@16")),
        ),
        "service_2w_over_1w_encode_c16_rps": _ratio(
            rps("service-2w.encode.x1@16"), rps("service.encode.x1@16")
        ),
        "service_encode_c64_p99_over_p50": tail("service.encode.x1@64"),
        "ceiling_c64_p99_over_p50": tail("ceiling.sink@64"),
        "naive_c64_p99_over_p50": tail("naive.encode.x1@64"),
        "service_encode_npy256_over_inprocess256_images": _ratio(
            images("service.encode.npy256"), inproc
        ),
        "service_encode_json256_over_inprocess256_images": _ratio(
            images("service.encode.json256"), inproc
        ),
        "rss_after_over_before": None if memory is None else memory.get("rss_ratio"),
    }


_RATIO_LABELS = {
    "service_encode_c16_over_ceiling_c16_rps": "service /encode x1 @16 vs ceiling @16 (req/s)",
    "service_encode_c16_over_bare_c16_rps": "service /encode x1 @16 vs bare ASGI @16 (req/s)",
    "ceiling_c16_over_bare_c16_rps": "ceiling @16 vs bare ASGI @16 (req/s)",
    "service_encode_c16_over_baseline_c16_rps": "service /encode x1 @16 vs the baseline "
    "commit's (req/s)",
    "service_anomaly_c16_over_baseline_c16_rps": "service /anomaly-score x1 @16 vs the "
    "baseline commit's (req/s)",
    "service_encode_c16_over_naive_c16_rps": "service /encode x1 @16 vs naive @16 (req/s)",
    "service_encode_c16_over_litserve_best_c16_rps": "service /encode x1 @16 vs LitServe's "
    "best @16 (req/s)",
    "service_2w_over_1w_encode_c16_rps": "service /encode x1 @16: 2 workers vs 1 (req/s)",
    "service_encode_c64_p99_over_p50": "service /encode x1 @64: p99 / p50",
    "ceiling_c64_p99_over_p50": "ceiling @64: p99 / p50",
    "naive_c64_p99_over_p50": "naive @64: p99 / p50",
    "service_encode_npy256_over_inprocess256_images": "service /encode 256 npy vs in-process "
    "batch 256 (images/s)",
    "service_encode_json256_over_inprocess256_images": "service /encode 256 json vs in-process "
    "batch 256 (images/s)",
    "rss_after_over_before": "service RSS after / before the memory run",
}


def _best(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def ratio_lines(values: dict[str, float | None]) -> str:
    width = max(len(v) for v in _RATIO_LABELS.values())
    lines = []
    for key, label in _RATIO_LABELS.items():
        value = values.get(key)
        lines.append(f"  {label:<{width}}  {'n/a' if value is None else f'{value:.3f}'}")
    return "\n".join(lines)
