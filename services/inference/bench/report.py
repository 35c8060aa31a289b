"""The benchmark report: throughput, latency percentiles, adapter cache hit rate; text, JSON, PNG.

Definitions (over the successful requests of the measured run, duration D = last end - first start):
  request_throughput = completed / D                     [req/s]
  output_throughput  = sum(output tokens) / D            [tok/s]
  total_throughput   = sum(prompt + output tokens) / D   [tok/s]
  TTFT = first token - sent; TPOT = (end - first token) / (output tokens - 1), for requests with
  >= 2 output tokens; ITL = every gap between successive chunks after the first, over all requests
  (vLLM's definition); E2E latency = end - sent. Percentiles interpolate linearly (numpy's default);
  which metrics and percentiles are reported: --percentile-metrics / --metric-percentiles (vLLM names).
  Goodput (DistServe, vLLM's --goodput): completed requests that meet every given SLO (ttft, tpot,
  e2el in ms; a request without a value for an SLO'd metric does not meet it) per second.
  Cache hit rate of a tier = hits / (hits + misses) during the run (None when it had no lookups);
  the headline rate is the device (GPU slot) tier's, else the host tier's.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np

from .runner import BenchResult, records_as_dicts

PERCENTILES = (50, 90, 99)
METRICS = {"ttft": "ttft_s", "tpot": "tpot_s", "itl": "itl_s", "e2el": "e2e_latency_s"}   # name -> report key
LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def _pkey(p: float) -> str:
    return f"p{p:g}"


def distribution(values: list[float], percentiles=PERCENTILES) -> dict[str, float | None]:
    if not values:
        return {"avg": None, "min": None, "max": None, **{_pkey(p): None for p in percentiles}}
    arr = np.asarray(values, dtype=np.float64)
    return {"avg": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max()),
            **{_pkey(p): float(np.percentile(arr, p)) for p in percentiles}}


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 0.2, "tpot": 0.05} (seconds); names as --percentile-metrics."""
    slos = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
        slos[key] = ms / 1000.0
    return slos


def meets_slos(r, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.latency}
    # a 1-token request has no TPOT: it meets a TPOT SLO (vLLM treats its TPOT as 0)
    values["tpot"] = values["tpot"] if r.output_tokens >= 2 else 0.0
    return all(values[k] is not None and values[k] <= limit for k, limit in slos.items())


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


def build_report(result: BenchResult, include_requests: bool = True, percentiles=PERCENTILES,
                 percentile_metrics=tuple(METRICS), slos: dict[str, float] | None = None, **extra_meta) -> dict:
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
        "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None], percentiles),
        "tpot_s": distribution([r.tpot for r in ok if r.tpot is not None], percentiles),
        "itl_s": distribution([g for r in ok for g in r.itl], percentiles),
        "e2e_latency_s": distribution([r.latency for r in ok], percentiles),
        "percentiles": list(percentiles),
        "percentile_metrics": list(percentile_metrics),
        "num_adapters": sum(1 for k in adapters if k != "<base>"),
        "requests_per_adapter": dict(adapters.most_common()),
        "adapter_cache": hit_rates(result.cache_delta()),
    }
    if slos:
        good = sum(1 for r in ok if meets_slos(r, slos))
        report["slos_ms"] = {k: v * 1000 for k, v in slos.items()}
        report["num_good"] = good
        report["goodput_rps"] = good / duration if duration > 0 else 0.0
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
             f"Total token throughput (tok/s):{report['total_tokens_per_s']:.2f}"]
    if "goodput_rps" in report:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in report["slos_ms"].items())
        lines.append(f"Goodput (req/s):               {report['goodput_rps']:.3f}  "
                     f"({report['num_good']}/{report['num_completed']} met {slos})")
    lines.append("")
    cols = ["avg", *(_pkey(p) for p in report.get("percentiles", PERCENTILES)), "max"]
    lines.append(f"{'latency (ms)':<16}" + "".join(f"{c:>10}" for c in cols))
    for name in report.get("percentile_metrics", METRICS):
        d = report[METRICS[name]]
        lines.append(f"{LABELS[name]:<16}" + "".join(f"{_ms(d.get(k)):>10}" for k in cols))
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


def popularity_buckets(rows: list[dict]) -> dict[str, set]:
    """Adapters ranked by request count: 'hot' (top 20% of adapters), 'warm' (next 30%), 'cold' (the rest),
    and the base model alone; empty buckets are dropped."""
    counts = Counter(r["adapter"] for r in rows if r["adapter"] is not None)
    ranked = [a for a, _ in counts.most_common()]
    n = len(ranked)
    hot, warm = max(1, round(0.2 * n)) if n else 0, round(0.3 * n)
    buckets = {f"hot adapters ({hot})": set(ranked[:hot]), f"warm adapters ({warm})": set(ranked[hot:hot + warm]),
               f"cold adapters ({n - hot - warm})": set(ranked[hot + warm:]), "base model": {None}}
    return {k: v for k, v in buckets.items() if v and any(r["adapter"] in v for r in rows)}


def plot_latency(report: dict, path: str) -> None:
    """PNG, two panels that read well for a burst: the E2E latency CDF per adapter-popularity bucket
    (is the cold tail slower?), and output tokens/s over time with completions and failures marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["requests"] if r["error"] is None]
    failed = [r for r in report["requests"] if r["error"] is not None]
    fig, (cdf, tput) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for label, members in popularity_buckets(rows).items():
        lat = np.sort([r["latency"] * 1000 for r in rows if r["adapter"] in members])
        cdf.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", label=f"{label}, n={len(lat)}")
    cdf.set_xlabel("E2E latency (ms)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("latency CDF by adapter popularity")
    cdf.grid(alpha=0.3)
    cdf.legend(loc="lower right", fontsize=8)
    duration = max([report["duration_s"], *(r["end"] for r in rows)], default=1.0) or 1.0
    bins = np.linspace(0.0, duration, min(60, max(5, len(rows) // 4)) + 1)
    width = bins[1] - bins[0]
    tokens = np.zeros(len(bins) - 1)
    for r in rows:  # spread each request's output tokens evenly over its decode time (first token -> end)
        t0 = r["first_token"] if r["first_token"] is not None else r["end"]
        lo, hi = np.clip(np.searchsorted(bins, [t0, r["end"]], side="right") - 1, 0, len(tokens) - 1)
        tokens[lo:hi + 1] += r["output_tokens"] / (hi - lo + 1)
    tput.bar(bins[:-1], tokens / width, width=width, align="edge", alpha=0.7, label="output tok/s")
    tput.set_xlabel("time since start (s)")
    tput.set_ylabel("output tokens/s")
    ends = tput.twinx()
    ends.plot(sorted(r["end"] for r in rows), np.arange(1, len(rows) + 1), color="black", linewidth=1,
              label="completed requests")
    if failed:
        ends.scatter([r["end"] for r in failed], [0] * len(failed), color="red", marker="v", label="failed")
    ends.set_ylabel("requests completed")
    tput.set_title(f"{report['num_completed']} requests, {report['output_tokens_per_s']:.1f} output tok/s overall")
    tput.grid(alpha=0.3)
    handles = tput.get_legend_handles_labels()[0] + ends.get_legend_handles_labels()[0]
    tput.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
