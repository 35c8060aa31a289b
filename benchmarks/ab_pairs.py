"""Interleaved A/B closed loops: a throughput ratio that drift between loops cannot bias.

On the H200 the same closed loop's tok/s drifts from one loop to the next by up to 6% (clocks, the host;
PERF_NOTES, resident third pass: the base alone went 17193 -> 18499 tok/s within one run). A ratio of A
measured once against B measured once (or all A loops, then all B loops) carries that drift whole. Here the
loops run in pairs whose order alternates (A B, B A, A B, ...: a drift that favours the second loop of a
pair favours A in one pair and B in the next), each pair gives its own A / B, and the figure is the median of
the pair ratios, reported with their spread (min, max) and every loop's tok/s.

Every loop also reports the CUDA graphs captured inside it (a capture stalls a 32-layer step by ~50-150 ms,
i.e. several % of a 3 s loop): a timed loop should capture none, its warm-up having met the load's shapes.
"""
from __future__ import annotations

import statistics
from typing import Callable


def graph_counts(engine) -> tuple[int, int, int]:
    """(mixed-step plain graphs, mixed-step LoRA graphs, decode LoRA graphs with a bounded grid) captured so far."""
    runner = getattr(engine, "runner", None)
    mixed = getattr(runner, "mixed_graphs", None)
    decode = getattr(runner, "graph_runner", None)
    return (len(mixed.graphs) if mixed is not None else 0, len(mixed.lora_graphs) if mixed is not None else 0,
            len(getattr(decode, "seg_graphs", None) or {}))


def interleaved_ratio(engine, run_a: Callable[[int], dict], run_b: Callable[[int], dict], pairs: int,
                      log: Callable[[str], None] | None = print) -> dict:
    """`pairs` pairs of loops, pair k running A then B for even k, B then A for odd k. run_a(i) / run_b(i) run one
    closed loop (i: the loop's index, e.g. for fresh prompts) and return a dict with "tok_s". Returns ratio
    (median of the per-pair A / B), ratios, spread (min, max), a / b (each loop's result dict, with the graphs
    captured inside it under "captures"), order and captures_in_timed_loops (their total)."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    a_runs, b_runs, ratios, order = [], [], [], []
    captures = 0
    for k in range(pairs):
        pair = {}
        for tag in (("A", "B") if k % 2 == 0 else ("B", "A")):
            before = graph_counts(engine)
            r = (run_a if tag == "A" else run_b)(2 * k + len(pair))
            r["captures"] = [x - y for x, y in zip(graph_counts(engine), before)]
            captures += sum(r["captures"])
            pair[tag] = r
            order.append(tag)
        a_runs.append(pair["A"])
        b_runs.append(pair["B"])
        ratios.append(pair["A"]["tok_s"] / pair["B"]["tok_s"])
        if log is not None:
            log(f"  pair {k + 1} ({'AB' if k % 2 == 0 else 'BA'}): A {pair['A']['tok_s']:.0f} / B "
                f"{pair['B']['tok_s']:.0f} tok/s = {ratios[-1]:.3f}  (graphs captured inside: A {pair['A']['captures']}, "
                f"B {pair['B']['captures']})")
    return dict(ratio=statistics.median(ratios), ratios=ratios, spread=(min(ratios), max(ratios)), a=a_runs,
                b=b_runs, order="".join(order), captures_in_timed_loops=captures,
                ratio_of_medians=statistics.median(r["tok_s"] for r in a_runs)
                / statistics.median(r["tok_s"] for r in b_runs))


def median_run(runs: list[dict]) -> dict:
    """The loop of median tok/s (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["tok_s"])[(len(runs) - 1) // 2]


def most_replayed(engine, top: int = 8) -> list:
    """[[(Bp, T, splits[, segments], LoRA), replays], ...]: the mixed-step graphs replayed most so far (which step
    shapes a load ran), printed; [] without mixed-step graphs."""
    mixed = getattr(getattr(engine, "runner", None), "mixed_graphs", None)
    if mixed is None:
        return []
    shapes = sorted(getattr(mixed, "key_replays", {}).items(), key=lambda kv: -kv[1])[:top]
    print("  most replayed mixed-step graphs (Bp, T, splits[, segments], LoRA): "
          + ", ".join(f"{k} x{n}" for k, n in shapes))
    return [[list(k), n] for k, n in shapes]
