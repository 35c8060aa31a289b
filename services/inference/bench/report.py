"""The benchmark report: throughput, latency percentiles, adapter cache hit rate; text, JSON, PNG.

Definitions (over the successful requests of the measured run, duration D = last end - first start):
  request_throughput = completed / D                     [req/s]
  output_throughput  = sum(output tokens) / D            [tok/s]
  total_throughput   = sum(prompt + output tokens) / D   [tok/s]
  TTFT = first token - sent; TPOT = (end - first token) / (output tokens - 1), for requests with
  >= 2 output tokens; E2E latency = end - sent. Percentiles interpolate linearly (numpy's default).
  Cache hit rate of a tier = hits / (hits + misses) during the run (None when it had no lookups);
  the headline rate is the device (GPU slot) tier's, else the host tier's.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np

from .runner import BenchResult, records_as_dicts

PERCENTILES = (50, 90, 99)


def distribution(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"avg": None, "min": None, "max": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64)
    return {"avg": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()),
            **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def hit_rates(delta: dict[str, dict[str, int]]) -> dict:
    tiers = {}
    for tier, c in delta.items():
        lookups = c.get("hits", 0) + c.get("misses", 0)
        tiers[tier] = dict(c, hit_rate=(c.get("hits", 0) / lookups) if lookups else None)
    headline = None
    for tier in ("device", "host"):
        if tiers.get(tier, {}).get("hit_rate") is not None:
            headline = tiers[tier]["hit_rate"]
            break
    return {"hit_rate": headline, "tiers": tiers}


def build_report(result: BenchResult, include_requests: bool = True, **extra_meta) -> dict:
    ok = [r for r in result.records if r.ok]
    failed = [r for r in result.records if not r.ok]
    duration = result.duration
    in_tok = sum(r.prompt_tokens for r in ok)
    out_tok = sum(r.output_tokens for r in ok)
    adapters = Counter(r.adapter or "<base>" for r in result.records)
    report = {
        **result.meta, **extra_meta,
        "num_requests": len(result.records),
        "num_completed": len(ok),
        "num_failed": len(failed),
        "errors": dict(Counter(r.error for r in failed).most_common(10)),
        "duration_s": duration,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput_rps": len(ok) / duration if duration > 0 else 0.0,
        "output_tokens_per_s": out_tok / duration if duration > 0 else 0.0,
        "total_tokens_per_s": (in_tok + out_tok) / duration if duration > 0 else 0.0,
        "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": distribution([r.tpot for r in ok if r.tpot is not None]),
        "e2e_latency_s": distribution([r.latency for r in ok]),
        "num_adapters": sum(1 for k in adapters if k != "<base>"),
        "requests_per_adapter": dict(adapters.most_common()),
        "adapter_cache": hit_rates(result.cache_delta()),
    }
    if include_requests:
        report["requests"] = records_as_dicts(result)
    return report


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.2f}"


def format_report(report: dict) -> str:
    """trtllm-bench style summary for the terminal."""
    bar = "=" * 64
    lines = [bar, "= LORASERVE BENCHMARK: PERFORMANCE OVERVIEW", bar,
             f"Target:                        {report.get('target')}",
             f"Dataset:                       {report.get('dataset')}",
             f"Concurrency / request rate:    {report.get('concurrency') or 'unbounded'} / "
             f"{report.get('request_rate') or 'inf'} req/s",
             f"Requests (completed/failed):   {report['num_completed']}/{report['num_failed']}",
             f"Adapters used:                 {report['num_adapters']}",
             f"Duration (s):                  {report['duration_s']:.3f}",
             f"Input / output tokens:         {report['total_input_tokens']} / {report['total_output_tokens']}",
             "",
             f"Request throughput (req/s):    {report['request_throughput_rps']:.3f}",
             f"Output throughput (tok/s):     {report['output_tokens_per_s']:.2f}",
             f"Total token throughput (tok/s):{report['total_tokens_per_s']:.2f}",
             "",
             f"{'latency (ms)':<16}{'avg':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}"]
    for label, key in (("TTFT", "ttft_s"), ("TPOT", "tpot_s"), ("E2E latency", "e2e_latency_s")):
        d = report[key]
        lines.append(f"{label:<16}" + "".join(f"{_ms(d[k]):>10}" for k in ("avg", "p50", "p90", "p99", "max")))
    cache = report["adapter_cache"]
    lines.append("")
    rate = cache["hit_rate"]
    lines.append(f"Adapter cache hit rate:        {'-' if rate is None else f'{rate:.1%}'}")
    for tier, c in cache["tiers"].items():
        r = c.get("hit_rate")
        lines.append(f"  {tier:<8} hits {c.get('hits', 0):>6}  misses {c.get('misses', 0):>6}  "
                     f"evictions {c.get('evictions', 0):>6}  hit rate {'-' if r is None else f'{r:.1%}'}")
    if report["errors"]:
        lines.append("")
        lines.append("Errors:")
        lines += [f"  {n} x {msg}" for msg, n in report["errors"].items()]
    lines.append(bar)
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)


def plot_latency(report: dict, path: str) -> None:
    """PNG: each request's E2E latency and TTFT against its send time, plus a running p50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in report["requests"] if r["error"] is None), key=lambda r: r["start"])
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    if rows:
        t = [r["start"] for r in rows]
        ax.scatter(t, [r["latency"] * 1000 for r in rows], s=10, label="E2E latency")
        ax.scatter(t, [(r["ttft"] or 0) * 1000 for r in rows], s=10, marker="x", label="TTFT")
        window = min(len(rows), max(5, len(rows) // 20))
        lat = np.asarray([r["latency"] * 1000 for r in rows])
        running = [float(np.median(lat[max(0, i - window + 1): i + 1])) for i in range(len(lat))]
        ax.plot(t, running, color="black", linewidth=1, label=f"E2E running median ({window} req)")
    failed = [r for r in report["requests"] if r["error"] is not None]
    if failed:
        ax.scatter([r["start"] for r in failed], [0] * len(failed), color="red", marker="v", label="failed")
    ax.set_xlabel("request sent at (s since start)")
    ax.set_ylabel("ms")
    ax.set_title(f"loraserve bench: {report['num_completed']} requests, "
                 f"{report['output_tokens_per_s']:.1f} output tok/s")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
