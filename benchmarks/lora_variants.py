"""Classic vs streaming multi-LoRA kernels in one run (`bench_lora_kernels.py --compare` /
`--sweep-stream`; the Case, shapes and limits are bench_lora_kernels.py's): LORASERVE_LORA_STREAM=0
"classic", =1 "stream". Times lora_apply with each variant on the layer case, the 1-token case and
the >= 32 MB shapes, and the largest output difference between them; chooses nothing."""
from __future__ import annotations

import statistics
import time

from benchmarks.bench_lora_kernels import PROJECTIONS, Case, base_layer_us, shape_bytes, sweep_shapes
from loraserve.kernels import lora_apply, lora_meta


VARIANTS = {"classic": False, "stream": True}  # lora_meta.LORA_STREAM value of each kernel variant


def compare_case(c: Case, breakdown: bool = False) -> dict:
    """us of lora_apply with each variant on one Case, plus the largest |difference| of their
    outputs from the same input (a GPU-only miscompile shows here; bf16 noise is ~1e-2)."""
    row = {}
    outs = {}
    y0 = c.y.clone()
    for name, stream in VARIANTS.items():
        c.use_variant(stream)
        row[name] = c.time()
        if breakdown:
            row[name + "_shrink"] = c.time("shrink_only")
            row[name + "_expand"] = c.time("expand_only")
        row[name + "_path"] = c.path
        c.y.copy_(y0)
        a, b = c.ab(0)
        lora_apply(c.x, c.y, a, b, c.offsets, c.meta, c.ranks, c.ws)
        outs[name] = c.y.float().clone()
    c.y.copy_(y0)
    delta = (outs["classic"] - y0.float()).abs().max().item()
    row["max_abs_diff"] = (outs["stream"] - outs["classic"]).abs().max().item()
    row["max_abs_delta"] = delta
    return row


def compare(bw: float, max_shapes: int | None, smoke: bool = False) -> dict:
    """Classic vs streaming kernels (LORASERVE_LORA_STREAM=0 / 1) in one run, on the three
    targets: the 64-token / 32-adapter / rank-16 layer, 1 token per projection, the shapes
    moving >= 32 MB (evenly subsampled to max_shapes). Nothing is chosen here: both are printed."""
    t0 = time.perf_counter()
    dev = "cpu" if smoke else "cuda"
    default = "stream" if lora_meta.LORA_STREAM else "classic"
    print(f"compare: classic (LORASERVE_LORA_STREAM=0) vs stream (=1); default in this process: {default}",
          flush=True)
    res: dict = {"copy_bw_gbs": bw, "default_variant": default}
    base = float("nan") if smoke else base_layer_us(64)
    res["base_layer_gemm_us_64tok"] = base
    layer = {}
    for p in PROJECTIONS:
        layer[p] = compare_case(Case(p, 16, 32 if not smoke else 4, 64 if not smoke else 16, dev, smoke),
                                breakdown=True)
        r = layer[p]
        parts = "".join(f"  {v}: shrink {r[v + '_shrink']:.1f} + expand {r[v + '_expand']:.1f}"
                                         for v in VARIANTS)
        print(f"  layer {p:8s} classic {r['classic']:7.1f} us ({r['classic_path']})  stream {r['stream']:7.1f} us "
              f"({r['stream_path']})  x{r['classic'] / r['stream']:.2f}  max|diff| {r['max_abs_diff']:.2e} "
              f"(|delta| {r['max_abs_delta']:.2e}){parts}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    one = {}
    for p in PROJECTIONS:
        one[p] = r = compare_case(Case(p, 16, 1, 1, dev, smoke))
        print(f"  1 token {p:8s} classic {r['classic']:6.2f} us ({r['classic_path']})  stream {r['stream']:6.2f} us "
              f"({r['stream_path']})  max|diff| {r['max_abs_diff']:.2e}  [{time.perf_counter() - t0:.0f} s]",
              flush=True)
    shapes = [sh for sh in sweep_shapes(smoke) if smoke or shape_bytes(*sh) >= 32e6]
    if max_shapes and len(shapes) > max_shapes:
        shapes = [shapes[round(i * (len(shapes) - 1) / (max_shapes - 1))] for i in range(max_shapes)] \
            if max_shapes > 1 else shapes[:1]
    big = []
    for proj, rank, L, T in shapes:
        c = Case(proj, rank, L, T, dev, smoke)
        r = compare_case(c)
        r.update(proj=proj, rank=rank, loras=L, tokens=T, mb=c.bytes / 1e6)
        for v in VARIANTS:
            r[v + "_bw_fraction"] = c.bytes / (r[v] * 1e-6) / 1e9 / bw
        big.append(r)
        print(f"  >=32MB {proj:8s} r{rank:<3d} L{L:<3d} T{T:<5d} {c.bytes / 1e6:6.1f} MB  classic {r['classic']:7.1f} us "
              f"{r['classic_bw_fraction']:5.3f}  stream {r['stream']:7.1f} us {r['stream_bw_fraction']:5.3f}  "
              f"max|diff| {r['max_abs_diff']:.2e}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        del c
    print("\nCOMPARE (same run)          classic    stream   target")
    for v in VARIANTS:
        lay = sum(layer[p][v] for p in PROJECTIONS)
        res[v] = dict(lora_layer_us=lay, lora_layer_over_base=lay / base,
                      lora_layer_us_per_proj={p: layer[p][v] for p in PROJECTIONS},
                      lora_1tok_us_per_proj=statistics.median(one[p][v] for p in PROJECTIONS),
                      lora_1tok_us={p: one[p][v] for p in PROJECTIONS},
                      lora_32mb_bw_fraction_median=statistics.median(r[v + "_bw_fraction"] for r in big),
                      num_32mb_shapes=len(big))
    res["shapes"] = big
    rows = [("lora_layer_us", "", "%.1f"), ("lora_layer_over_base", "<= 0.35", "%.3f"),
            ("lora_1tok_us_per_proj", "<= 5", "%.2f"), ("lora_32mb_bw_fraction_median", ">= 0.6", "%.3f")]
    for key, target, fmt in rows:
        print(f"  {key:28s} {fmt % res['classic'][key]:>8s}  {fmt % res['stream'][key]:>8s}   {target}")
    worst = max([r["max_abs_diff"] for r in big] + [layer[p]["max_abs_diff"] for p in layer]
                + [one[p]["max_abs_diff"] for p in one])
    res["max_abs_diff_stream_vs_classic"] = worst
    print(f"  max |stream - classic| over every case: {worst:.2e}; base layer GEMMs {base:.1f} us; "
          f"copy {bw:.0f} GB/s; {len(big)} shapes >= 32 MB; {time.perf_counter() - t0:.0f} s", flush=True)
    from loraserve.kernels.lora_expand import _STREAM_FAILED

    res["stream_fell_back_to_classic"] = sorted(str(k) for k in _STREAM_FAILED)
    if _STREAM_FAILED:
        print(f"  WARNING: the streaming expand failed to compile for {res['stream_fell_back_to_classic']}: "
              "those 'stream' figures are the classic kernel's", flush=True)
    lora_meta.LORA_STREAM = VARIANTS[default]
    return res


def sweep_stream(smoke: bool = False) -> None:
    """Streaming expand knobs on the layer case (expand alone, from lora_apply's workspace):
    programs per SM (column groups per tile) x BLOCK_N. Not run by --compare."""
    from loraserve.kernels.lora_expand_stream import stream_expand_config

    print("\nsweep-stream: 64 tokens, 32 adapters, rank 16; streaming expand alone, us per projection")
    lora_meta.LORA_STREAM = True
    for proj in PROJECTIONS:
        c = Case(proj, 16, 4, 16, "cpu", smoke=True) if smoke else Case(proj, 16, 32, 64)
        c.use_variant(True)
        c.calls("shrink_only")[0]()  # real partials in the workspace (not uninitialised memory)
        SK, S, T, R = c.ws.shape
        cells = [f"default={c.time('expand_only'):.1f}"]
        for per_sm in (2, 4, 8):
            for bn in (64, 128, 256):
                base = stream_expand_config(T, c.N, R, S, c.meta.block_m, c.meta.grid_tiles, SK)
                blocks = -(-c.N // bn)
                groups = max(1, min(blocks, round(per_sm * 132 / c.meta.grid_tiles)))
                cfg = dict(BLOCK_N=bn, COLS_PER_PROG=-(-blocks // groups) * bn,
                           num_warps=4 if c.meta.block_m * bn <= 2048 else 8, SK_CHUNK=base["SK_CHUNK"])
                cells.append(f"p{per_sm}/n{bn}={c.time('expand_only', cfg=cfg):.1f}")
        print(f"{proj}: " + " ".join(cells), flush=True)
