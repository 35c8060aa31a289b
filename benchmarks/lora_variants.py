"""Multi-LoRA kernel variants side by side in one run (`bench_lora_kernels.py --compare
[--variants a,b,...]`, `--sweep-stream`, `--sweep-onelaunch`; the Case, shapes and limits are
bench_lora_kernels.py's). Variants (lora_apply switches; "default": as the environment and the code's
defaults set them):
  classic    LORASERVE_LORA_STREAM=0: shrink + classic expand (one program per column block)
  stream     LORASERVE_LORA_STREAM=1, PDL off, 2 B blocks ahead: the default until the PDL run
  onelaunch  LORASERVE_LORA_ONELAUNCH=1: one launch per projection, ticketed roles (lora_onelaunch.py),
             at every token count (onelaunch256: only up to 256 tokens, lora_apply's range)
  fused      LORASERVE_LORA_FUSED=1: one launch with a grid barrier (lora_fused.py)
  pdl        LORASERVE_LORA_PDL=1: stream with programmatic dependent launch (the expand launches
             while the shrink runs, fetches B, then waits: griddepcontrol), 2 B blocks ahead
  a3, pdl_a3 stream / pdl with 3 B blocks in flight per expand program (lora_expand_stream.STREAM_B_AHEAD);
             the default is now pdl with 3 ahead at decode-like tiles
  bgmv       pdl (code's B-ahead rule) + the BGMV shrink (LORASERVE_LORA_BGMV=1, lora_shrink_bgmv.py);
             pdl_nobgmv: the same with the BGMV shrink off; prev: the default of the 12:20 final run
             (dot shrink, B blocks ahead by the code's rule, y 1 block ahead, the hand-rotated loop);
             nopipe: the default (BGMV <= 32 tokens) with the hand-rotated expand loop; bgmv64: the
             default with the BGMV shrink up to 64 tokens (the layer case)
  pipe3/4/6  the expand's column loop given to Triton's pipeliner with 3/4/6 stages (cp.async for B and y;
             lora_expand_stream.STREAM_SLOTS=-S); slots3: fixed-slot hand prefetch 3 ahead; pipe4_bgmv: + BGMV
  bgmv_s8    bgmv aiming at 8 K chunks (lora_shrink_bgmv.BGMV_TARGET_SPLIT; default 4); bgmv_k256 / bgmv_k2048:
             a fixed BLOCK_K (BGMV_BLOCK_K)
  ya2, ya3   pdl with y blocks 2 / 3 ahead in the streaming expand (lora_expand_stream.STREAM_Y_AHEAD; was 1);
             bgmv_ya2, bgmv_ya3: with the BGMV shrink too; bgmv_ya3_a4: and 4 B blocks ahead
  pf_<letters>[_b64]  LORASERVE_LORA_PREFETCH=<letters> (kernels/lora_prefetch.py): a = the BGMV shrink loads A
             into registers before its griddepcontrol.wait, l = the dot shrink prefetches A into L2 there, b = the
             expand prefetches its whole B run into L2 before its wait, t = the expand lets the next kernel launch at
             its start; _b64: with the BGMV shrink up to 64 tokens (b64: that alone); _k2048: BGMV BLOCK_K 2048;
             nopf: the default with all of it off
  dense      default + LORASERVE_LORA_DENSE=triton: the dense shrink (every token against every slot's A,
             one split-K GEMM kernel, lora_shrink_dense.py) at 32-256 tokens when the pool has <= T slots;
             dense_mm: the same shrink as one cuBLAS GEMM (torch.mm)
  xdense     default + LORASERVE_LORA_DENSE_EXPAND=1: the dense expand (lora_expand_dense.py) at <= 64 tokens on
             projections >= 8192 wide (gate_up); dense_xdense: with the dense shrink too; dense_xdense_all: and
             the dense expand on every projection (64-column blocks below 25k columns)
Cases run variant by variant (every case of one variant, then the next), each variant's summary
printed as soon as it is done, so a variant that hangs (killed by an outer `timeout`) leaves the
earlier ones on record. Outputs are compared with the first variant's from the same input, and
each variant is run twice from that input: max|diff| and bit-equality are printed. Chooses nothing.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from benchmarks.bench_lora_kernels import PROJECTIONS, Case, base_layer_us, shape_bytes, sweep_shapes
from loraserve.kernels import lora_apply, lora_expand_bgmv, lora_expand_stream, lora_meta, lora_onelaunch, lora_shrink_bgmv

_apply_module = __import__("loraserve.kernels.lora_apply", fromlist=["lora_apply"])  # the module
# "default": the switches as this process found them (environment + code defaults), i.e. what the
# engine runs.
DEFAULT = dict(stream=lora_meta.LORA_STREAM, onelaunch=_apply_module.ONELAUNCH_ENABLED,
               fused=_apply_module.FUSED_ENABLED, pdl=lora_meta.LORA_PDL,
               onelaunch_max_tokens=lora_onelaunch.ONELAUNCH_MAX_TOKENS,
               b_ahead=lora_expand_stream.STREAM_B_AHEAD, bgmv=lora_meta.LORA_BGMV,
               y_ahead=lora_expand_stream.STREAM_Y_AHEAD, bgmv_split=lora_shrink_bgmv.BGMV_TARGET_SPLIT,
               bgmv_block_k=lora_shrink_bgmv.BGMV_BLOCK_K, slots=lora_expand_stream.STREAM_SLOTS,
               bgmv_max_tokens=lora_meta.LORA_BGMV_MAX_TOKENS, dense=_apply_module.DENSE_MODE,
               dense_expand=_apply_module.DENSE_EXPAND, dense_expand_min_n=_apply_module.DENSE_EXPAND_MIN_N,
               prefetch=lora_meta.LORA_PREFETCH, bgmv_wide_block_k=lora_shrink_bgmv.BGMV_WIDE_BLOCK_K,
               pipe_min_blocks=lora_expand_stream.STREAM_PIPE_MIN_BLOCKS,
               expand_bgmv=__import__("loraserve.kernels.lora_expand", fromlist=["EXPAND_BGMV"]).EXPAND_BGMV,
               xb_block_n=lora_expand_bgmv.EXPAND_BGMV_BLOCK_N, xb_warps=lora_expand_bgmv.EXPAND_BGMV_WARPS,
               xb_pps=lora_expand_bgmv.EXPAND_BGMV_PPS, stream_block_n=lora_expand_stream.STREAM_BLOCK_N,
               bgmv_max_rank=lora_meta.LORA_BGMV_MAX_RANK,
               xb_max_slices=__import__("loraserve.kernels.lora_expand", fromlist=["X"]).EXPAND_BGMV_MAX_SLICES,
               group_major=lora_meta.LORA_GROUP_MAJOR, k_major=lora_meta.LORA_SHRINK_K_MAJOR)
_STREAM_PPS = lora_expand_stream.STREAM_PROGRAMS_PER_SM
_STREAM_PPS_DECODE = lora_expand_stream.STREAM_PROGRAMS_PER_SM_DECODE
_STREAM_ONE = lora_expand_stream.STREAM_ONE_SLICE
_STREAM_ONE_MAX = lora_expand_stream.STREAM_ONE_SLICE_MAX_TOKENS
_BGMV_ROWS = lora_shrink_bgmv.BGMV_ROWS
_WAVE_CHUNKS = lora_shrink_bgmv.BGMV_WAVE_CHUNKS
_DGRID_ANY = lora_expand_stream.STREAM_PPS_DECODE_ANY
_KCH = (lora_shrink_bgmv.BGMV_KCHUNKS, lora_shrink_bgmv.BGMV_KCHUNKS_WIDE, lora_shrink_bgmv.BGMV_MAXNREG_WIDE)
_SK_MAX = lora_expand_stream.STREAM_SK_CHUNK_MAX
_WIDE_R64 = lora_shrink_bgmv.BGMV_WIDE_BLOCK_K_R64

VARIANTS = {
    "default": DEFAULT,
    "classic": dict(stream=False),
    "stream": dict(stream=True, b_ahead=2),  # the default before PDL and 3 B blocks ahead (2026-11-30)
    "onelaunch": dict(stream=True, onelaunch=True, onelaunch_max_tokens=4096),  # every T: the data sets the range
    "onelaunch256": dict(stream=True, onelaunch=True),  # lora_apply's range with the switch on
    "fused": dict(stream=True, fused=True),
    "pdl": dict(stream=True, pdl=True, b_ahead=2),  # stream + programmatic dependent launch
    "onelaunch_pdl": dict(stream=True, onelaunch=True, pdl=True),  # onelaunch where it applies, else pdl
    "a3": dict(stream=True, b_ahead=3),  # stream with 3 B blocks in flight per expand program
    "pdl_a3": dict(stream=True, pdl=True, b_ahead=3),
    "pdl_nobgmv": dict(stream=True, pdl=True),  # the default before the BGMV shrink
    "prev": dict(stream=True, pdl=True, y_ahead=1, slots=0),  # the default of 12:20 (dot shrink, rotating loop)
    "nopipe": dict(stream=True, pdl=True, bgmv=True, slots=0),  # today's default with the rotating loop
    "bgmv64": dict(stream=True, pdl=True, bgmv=True, bgmv_max_tokens=64),  # default + BGMV up to 64 tokens
    "bgmv": dict(stream=True, pdl=True, bgmv=True),  # + BGMV shrink (lora_shrink_bgmv.py) at <= 256 tokens
    "ya2": dict(stream=True, pdl=True, y_ahead=2),  # y blocks 2 ahead in the streaming expand (was 1)
    "ya3": dict(stream=True, pdl=True, y_ahead=3),
    "bgmv_ya2": dict(stream=True, pdl=True, bgmv=True, y_ahead=2),
    "bgmv_ya3": dict(stream=True, pdl=True, bgmv=True, y_ahead=3),
    "bgmv_ya3_a4": dict(stream=True, pdl=True, bgmv=True, y_ahead=3, b_ahead=4),
    "pipe3": dict(stream=True, pdl=True, slots=-3),  # expand column loop through Triton's pipeliner, 3 stages
    "pipe4": dict(stream=True, pdl=True, slots=-4),
    "pipe6": dict(stream=True, pdl=True, slots=-6),
    "slots3": dict(stream=True, pdl=True, slots=3),  # fixed-slot hand prefetch, 3 ahead
    "pipe4_bgmv": dict(stream=True, pdl=True, slots=-4, bgmv=True),
    "bgmv_s8": dict(stream=True, pdl=True, bgmv=True, bgmv_split=8),  # BGMV aiming at 8 K chunks
    "bgmv_k256": dict(stream=True, pdl=True, bgmv=True, bgmv_block_k=256),  # fixed BLOCK_K
    "bgmv_k2048": dict(stream=True, pdl=True, bgmv=True, bgmv_block_k=2048),
    # the dense shrink (every token x every slot, lora_shrink_dense.py) at 32-256 tokens with <= T slots
    # Loads / L2 prefetch before griddepcontrol.wait (kernels/lora_prefetch.py; LORASERVE_LORA_PREFETCH letters):
    # a = the BGMV shrink's A into registers, l = the dot shrink's A into L2, b = the expand's B run into L2,
    # t = the expand triggers the next kernel's launch at its start; _b64: the BGMV shrink up to 64 tokens
    "pf_albt": dict(stream=True, pdl=True, bgmv=True, prefetch="albt"),  # 22:01 probe's "abt": everything
    "pf_lt": dict(stream=True, pdl=True, bgmv=True, prefetch="lt"),
    "pf_at": dict(stream=True, pdl=True, bgmv=True, prefetch="at"),
    "b64": dict(stream=True, pdl=True, bgmv=True, bgmv_max_tokens=64, prefetch=""),
    "pf_a_b64": dict(stream=True, pdl=True, bgmv=True, bgmv_max_tokens=64, prefetch="a"),
    "pf_t_b64": dict(stream=True, pdl=True, bgmv=True, bgmv_max_tokens=64, prefetch="t"),
    "pf_at_b64": dict(stream=True, pdl=True, bgmv=True, bgmv_max_tokens=64, prefetch="at"),
    "pf_at_b64_k2048": dict(stream=True, pdl=True, bgmv=True, bgmv_max_tokens=64, prefetch="at", bgmv_block_k=2048),
    "nopf": dict(stream=True, pdl=True, bgmv=True, prefetch=""),
    "pipe64": dict(DEFAULT, slots=-4),  # the defaults with the expand's Triton-pipelined column loop at 33-64 tokens too
    "before": dict(stream=True, pdl=True, bgmv=True, prefetch=""),  # = nopf: b1789bc's defaults (BGMV <= 32 tokens,
    # its BLOCK_K by the target split only, nothing before the waits, no early trigger)  # the code's defaults with the prefetch off
    # the BGMV-style expand (lora_expand_bgmv.py, LORASERVE_LORA_EXPAND_BGMV; default since 2026-12-01 for single-slice
    # projections, 512 columns): on every projection with 256 columns (xbgmv, as in the 00:53 probe), 512 (_n512),
    # 128 (_n128); _p8 / _p2 programs per SM
    "xbgmv": dict(DEFAULT, expand_bgmv=True, xb_max_slices=3, xb_block_n=256),
    "xbgmv_n128": dict(DEFAULT, expand_bgmv=True, xb_max_slices=3, xb_block_n=128),
    "xbgmv_n512": dict(DEFAULT, expand_bgmv=True, xb_max_slices=3, xb_block_n=512),
    "xbgmv_p8": dict(DEFAULT, expand_bgmv=True, xb_max_slices=3, xb_block_n=256, xb_pps=8),
    "xbgmv_p2": dict(DEFAULT, expand_bgmv=True, xb_max_slices=3, xb_block_n=256, xb_pps=2),
    "noxbgmv": dict(DEFAULT, expand_bgmv=False),   # the default without the BGMV expand
    # the BGMV shrink's BLOCK_K 512 / 1024 for inputs wider than 8192 (down; default 2048): 28 / 14 K chunks, summed
    # cheaply by the BGMV expand (per row, once per program), a shrink of more, smaller programs (probe 00:53,
    # xbgmv_k512: down shrink 7.7 -> 7.0 us, 1 token 3.58 -> 3.17)
    # launch orders (lora_meta.LORA_GROUP_MAJOR / LORA_SHRINK_K_MAJOR): programs launched together read one adapter's
    # consecutive runs, not the same run of 32 adapters a slot stride apart (DRAM partition camping?)
    "gmajor": dict(DEFAULT, group_major=True),
    "kmajor": dict(DEFAULT, k_major=True),
    "gkmajor": dict(DEFAULT, group_major=True, k_major=True),
    "wide512": dict(DEFAULT, bgmv_wide_block_k=512),
    "wide1024": dict(DEFAULT, bgmv_wide_block_k=1024),
    # ... with the BGMV shrink's BLOCK_K 512 / 256 everywhere (more, smaller shrink programs: faster alone, H200
    # probe 13:28; their 8-56 partials cost the streaming expand's column loop, here one [SK, 16] load per row)
    "xbgmv_k512": dict(DEFAULT, expand_bgmv=True, xb_max_slices=3, xb_block_n=256, bgmv_block_k=512),
    "xbgmv_k256": dict(DEFAULT, expand_bgmv=True, xb_max_slices=3, xb_block_n=256, bgmv_block_k=256),
    # the streaming expand's Triton-pipelined column loop for runs of >= 8 blocks up to 256 tokens (gate_up)
    "pipegu": dict(DEFAULT, pipe_min_blocks=8),   # (the default since 2026-12-01: 10 blocks); nopipegu: off
    "nopipegu": dict(DEFAULT, pipe_min_blocks=0),
    # ... at every token count (the 1024-token "reduced" steps and 256-token tiles too: y read + write bound)
    "pipeall": dict(DEFAULT, slots=-4),
    "pipeall3": dict(DEFAULT, slots=-3),
    # the streaming expand's column loop plain (one stage: load and use in one iteration, nothing carried across the
    # back edge) with 256 / 512-column blocks at every token count (LORASERVE_LORA_STREAM_BLOCK_N)
    "plain256": dict(DEFAULT, slots=-1, stream_block_n=256),
    "plain512": dict(DEFAULT, slots=-1, stream_block_n=512),
    # the BGMV shrink only up to rank 16 / 32 (rank-64 decode steps: the dot shrink, fewer partials for the expand)
    "bgmv_r16": dict(DEFAULT, bgmv_max_rank=16),
    "bgmv_r32": dict(DEFAULT, bgmv_max_rank=32),
    # the defaults at the start of the ninth session (262c58e: BGMV shrink <= 64 tokens, BLOCK_K 2048 for down, loads
    # before the wait + early trigger, the streaming expand only): "before" of that session's final
    "prev9": dict(stream=True, pdl=True, bgmv=True, bgmv_max_tokens=64, prefetch="at", bgmv_wide_block_k=2048),
    # the segment-tiled pair (lora_seg.py, LORASERVE_LORA_SEG) off: the tile kernels at every size, as at the tenth
    # session's start (10af1f8); seg256: the pair from 256 tokens (LORASERVE_LORA_SEG_MIN_TOKENS)
    "prev10": dict(DEFAULT, seg=False, stream_one=False, kchunks=1, kchunks_wide=1,
                   maxnreg_wide=0, stream_pps=4, stream_pps_decode=4, stream_one_max_tokens=0, dgrid_any=False,
                   wave_chunks=(1, 1)),
    # the defaults at the eleventh session's start (98872c8), every knob of that session pinned
    "prev11": dict(DEFAULT, dgrid_any=False, bgmv_rows=4, kchunks=1, kchunks_wide=1, maxnreg_wide=0, wave_chunks=(1, 1)),
    "seg256": dict(DEFAULT, seg=True, seg_min_tokens=256),
    "seg512": dict(DEFAULT, seg=True, seg_min_tokens=512),
    "dense": dict(stream=True, pdl=True, bgmv=True, dense="triton"),
    "dense_mm": dict(stream=True, pdl=True, bgmv=True, dense="mm"),  # ... as one cuBLAS GEMM
    # the dense expand (lora_expand_dense.py: 128 columns x all tokens per program, slots 4 at a time) for
    # <= 64 tokens and N >= 8192 (gate_up), after the default shrink / after the dense shrink
    "xdense": dict(stream=True, pdl=True, bgmv=True, dense_expand=True),
    "dense_xdense": dict(stream=True, pdl=True, bgmv=True, dense="triton", dense_expand=True),
    "dense_xdense_all": dict(stream=True, pdl=True, bgmv=True, dense="triton", dense_expand=True,
                             dense_expand_min_n=1),  # ... the dense expand on every projection
}


# (the TMA-fed expand / shrink variants, tma*, were removed with their kernels in the eleventh session: PERF_NOTES)
VARIANTS.update({
    # the default (streaming) expand at 6 / 8 programs per SM (lora_expand_stream.STREAM_PROGRAMS_PER_SM, default 4)
    "stream_pps6": dict(DEFAULT, stream_pps=6),
    "stream_pps8": dict(DEFAULT, stream_pps=8),
    "pps4": dict(DEFAULT, stream_pps_decode=4),
    "noone": dict(DEFAULT, stream_one_max_tokens=0),
    # eleventh session: the BGMV shrink's one-wave rule (lora_shrink_bgmv.BGMV_WAVE_CHUNKS, default 4 / 8 chunks) off /
    # with 8 chunks at 1024 columns too; nodgrid: the decode grid only on gate_up's long runs
    "nowave": dict(DEFAULT, wave_chunks=(1, 1)),
    "wave88": dict(DEFAULT, wave_chunks=(8, 8)),
    "nodgrid": dict(DEFAULT, dgrid_any=False),
    "dgrid_all": dict(DEFAULT, dgrid_any=True),   # the decode grid (6 per SM) on qkv's short runs too (rotating loop)
    # the streaming expand's pipelined loop with one dot per block inside one slice (lora_expand_stream.STREAM_ONE_SLICE)
    "stream_one": dict(DEFAULT, stream_one=True),
    # the BGMV shrink's A block as 4 / 8 separate loads, one fp32 chunk live (lora_shrink_bgmv.BGMV_KCHUNKS, _WIDE for
    # down's 2048 columns, + a 128-register cap there): fewer registers, 2-3 programs per SM, one wave
    "kc4": dict(DEFAULT, kchunks=4, kchunks_wide=8, maxnreg_wide=128),
    "kc4_w4": dict(DEFAULT, kchunks=4, kchunks_wide=4),
    "kc8": dict(DEFAULT, kchunks=8, kchunks_wide=8, maxnreg_wide=128),
    "kc4_one": dict(DEFAULT, kchunks=4, kchunks_wide=8, maxnreg_wide=128, stream_one=True),
    "stream_one_pps6": dict(DEFAULT, stream_one=True, stream_pps=6),
    # twelfth session: the streaming expand's split-K partials one / two per load round (STREAM_SK_CHUNK_MAX)
    "sk1": dict(DEFAULT, sk_chunk_max=1),
    "sk2": dict(DEFAULT, sk_chunk_max=2),
    # the defaults at the twelfth session's start (2f35eac), every knob of that session pinned
    "prev12": dict(DEFAULT, sk_chunk_max=0),
    # thirteenth session: sk1 with the BGMV shrink's BLOCK_K 1024 for down at rank > 32 (14 partials, one a round;
    # lora_shrink_bgmv.BGMV_WIDE_BLOCK_K_R64) / 512 (28); prev13: the session's start pinned
    "sk1w": dict(DEFAULT, sk_chunk_max=1, wide_r64=1024),
    "sk1w512": dict(DEFAULT, sk_chunk_max=1, wide_r64=512),
    "sk2w": dict(DEFAULT, sk_chunk_max=2, wide_r64=1024),
    "w1024": dict(DEFAULT, wide_r64=1024),
    "prev13": dict(DEFAULT, sk_chunk_max=0, wide_r64=0, env={"LORASERVE_LORA_SEG_SHRINK_PER_SM_NARROW": "2"}),
})

# Segment-tiled pair knobs (lora_seg's environment knobs, read at each call) for the median's pair, o r64 L32 T1024 and
# qkv r64 L32 T256 (`--compare --big-only --shapes o:64:32:1024,qkv:64:32:256`). Each sets only its knobs; the seg
# configs' defaults otherwise (lora_seg.seg_shrink_config / seg_expand_config).
_SEG_ENV = {
    "seg_sw8": {"LORASERVE_LORA_SEG_SHRINK_WARPS": "8"},   # shrink 8 warps (with ~1 program per SM)
    "seg_bk128s2": {"LORASERVE_LORA_SEG_SHRINK_BK": "128", "LORASERVE_LORA_SEG_SHRINK_STAGES": "2"},
    "seg_bk128s3": {"LORASERVE_LORA_SEG_SHRINK_BK": "128", "LORASERVE_LORA_SEG_SHRINK_STAGES": "3"},
    "seg_bk256s3": {"LORASERVE_LORA_SEG_SHRINK_BK": "256", "LORASERVE_LORA_SEG_SHRINK_STAGES": "3"},
    "seg_bk256s2": {"LORASERVE_LORA_SEG_SHRINK_BK": "256", "LORASERVE_LORA_SEG_SHRINK_STAGES": "2"},
    # more stages: more of A in flight per program at ~1 shrink program per SM (o r64: BK 128 -> 147 KB; qkv r64's BK
    # would drop to 32 under the config's 160 KB cap, hence seg_s6bk64: 6 x 64-wide stages, 209 KB at qkv)
    "seg_s6": {"LORASERVE_LORA_SEG_SHRINK_STAGES": "6"},
    "seg_s6bk64": {"LORASERVE_LORA_SEG_SHRINK_STAGES": "6", "LORASERVE_LORA_SEG_SHRINK_BK": "64"},
    "seg_s6w8": {"LORASERVE_LORA_SEG_SHRINK_STAGES": "6", "LORASERVE_LORA_SEG_SHRINK_WARPS": "8"},
    "seg_split2": {"LORASERVE_LORA_SEG_SPLIT": "2"},
    "seg_split8": {"LORASERVE_LORA_SEG_SPLIT": "8"},
    "seg_nored": {"LORASERVE_LORA_SEG_REDUCE": "0"},   # the expand sums the planes (4 at ~1 shrink program per SM)
    "seg_xw4": {"LORASERVE_LORA_SEG_WARPS": "4"},       # expand 4 warps
    # the pair's metadata chains before their waits, the shrink letting the expand launch right after its own wait
    # (lora_seg.seg_early); _xt: the expand letting the next kernel launch after its wait too
    "seg_early": {"LORASERVE_LORA_SEG_EARLY": "1"},
    "seg_early_xt": {"LORASERVE_LORA_SEG_EARLY": "1", "LORASERVE_LORA_SEG_XTRIGGER": "1"},
    # ... and the expand's B run bulk-prefetched into L2 before its wait (the expand launched while the shrink runs)
    "seg_early_b": {"LORASERVE_LORA_SEG_EARLY": "1", "LORASERVE_LORA_SEG_EARLY_B": "1"},
    # ~1 shrink program per SM at rank <= 32 on inputs <= 8192 wide (qkv / o / gate_up r16; down r16 keeps 2)
    "seg_s1n": {"LORASERVE_LORA_SEG_SHRINK_PER_SM_NARROW": "1"},
    "seg_sw8_bk128s3": {"LORASERVE_LORA_SEG_SHRINK_WARPS": "8", "LORASERVE_LORA_SEG_SHRINK_BK": "128",
                        "LORASERVE_LORA_SEG_SHRINK_STAGES": "3"},
}
VARIANTS.update({k: dict(DEFAULT, env=v) for k, v in _SEG_ENV.items()})
# the thirteenth session's candidates together (they touch disjoint shapes: sk1 the streaming expand of the partials
# path, wide_r64 down's rank-64 BGMV shrink, s1n the rank-16 seg shrinks of 4096-wide inputs)
VARIANTS["c13"] = dict(DEFAULT, sk_chunk_max=1, wide_r64=1024, env=_SEG_ENV["seg_s1n"])
# (c13 = the defaults since probe 22:04) + the seg expand summing splits of <= 4 itself (no reduction in the shrink:
# lora_seg.seg_reduce's LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT); c13n512: with down's rank-64 BGMV BLOCK_K 512
_N4 = {"LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT": "4"}
VARIANTS.update({
    "c13n": dict(DEFAULT, sk_chunk_max=1, wide_r64=1024, env=dict(_SEG_ENV["seg_s1n"], **_N4)),
    "c13n512": dict(DEFAULT, sk_chunk_max=1, wide_r64=512, env=dict(_SEG_ENV["seg_s1n"], **_N4)),
    "c13n8": dict(DEFAULT, sk_chunk_max=1, wide_r64=1024,
                  env=dict(_SEG_ENV["seg_s1n"], LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT="8")),
    "seg_nored4": dict(DEFAULT, env=_N4),
    # fourteenth session: c13n is the default (the floor 4); prev14 pins the session's start (the reduction at any split)
    "prev14": dict(DEFAULT, env={"LORASERVE_LORA_SEG_REDUCE_MIN_SPLIT": "1"}),
})


_ENV_SET: set[str] = set()   # environment knobs the last variant set (read at each call by the kernels' launchers)


def _use_variant(c: Case, variant) -> None:
    """Case.use_variant plus this module's own switches (the ones Case does not know); a variant's "env" dict sets
    those environment variables (knobs read at each call, e.g. lora_seg's), unset again for the next variant."""
    for k in _ENV_SET:
        os.environ.pop(k, None)
    _ENV_SET.clear()
    if isinstance(variant, dict):
        os.environ.update(variant.get("env", {}))
        _ENV_SET.update(variant.get("env", {}))
    from loraserve.kernels import lora_seg

    lora_seg._SEG_FAILED.clear()   # a variant whose seg config failed to compile must not switch seg off for the next
    # (before Case.use_variant: the workspace's split count depends on it)
    lora_shrink_bgmv.BGMV_WIDE_BLOCK_K_R64 = variant.get("wide_r64", _WIDE_R64) if isinstance(variant, dict) else _WIDE_R64
    c.use_variant(variant)
    if isinstance(variant, dict):
        lora_expand_stream.STREAM_PROGRAMS_PER_SM = variant.get("stream_pps", _STREAM_PPS)
        # (stream_pps alone sets the decode steps' target too, as in the 04:33 probe that measured it)
        lora_expand_stream.STREAM_PROGRAMS_PER_SM_DECODE = variant.get("stream_pps_decode",
                                                                       variant.get("stream_pps", _STREAM_PPS_DECODE))
        lora_expand_stream.STREAM_ONE_SLICE = variant.get("stream_one", _STREAM_ONE)
        lora_expand_stream.STREAM_ONE_SLICE_MAX_TOKENS = variant.get("stream_one_max_tokens", _STREAM_ONE_MAX)
        lora_expand_stream.STREAM_PPS_DECODE_ANY = bool(variant.get("dgrid_any", _DGRID_ANY))
        lora_shrink_bgmv.BGMV_WAVE_CHUNKS = variant.get("wave_chunks", _WAVE_CHUNKS)
        lora_shrink_bgmv.BGMV_KCHUNKS = variant.get("kchunks", _KCH[0])
        lora_shrink_bgmv.BGMV_KCHUNKS_WIDE = variant.get("kchunks_wide", _KCH[1])
        lora_shrink_bgmv.BGMV_MAXNREG_WIDE = variant.get("maxnreg_wide", _KCH[2])
        lora_shrink_bgmv.BGMV_ROWS = variant.get("bgmv_rows", _BGMV_ROWS)
        lora_expand_stream.STREAM_SK_CHUNK_MAX = variant.get("sk_chunk_max", _SK_MAX)


def _run_case(c: Case, variant: dict, breakdown: bool) -> dict:
    """us of lora_apply with one variant, its path, and its output (twice, from the same y)."""
    _use_variant(c, variant)
    row = {"us": c.time(), "path": c.path}
    if breakdown and c.path in ("partials", "reduced", "dense", "seg"):
        row["shrink"] = c.time("shrink_only")
        row["expand"] = c.time("expand_only")
    y0 = c.y_init  # the same input y for every variant (timings keep adding to c.y)
    outs = []
    for _ in range(2):
        c.y.copy_(y0)
        a, b = c.ab(0)
        lora_apply(c.x, c.y, a, b, c.offsets, c.meta, c.ranks, c.ws)
        outs.append(c.y.float().cpu())
    c.y.copy_(y0)
    row["out"], row["repeat_equal"], row["y0"] = outs[0], bool(torch.equal(outs[0], outs[1])), y0.float().cpu()
    return row


def compare(bw: float, max_shapes: int | None, smoke: bool = False, variants: list[str] | None = None,
            shapes_only: list[tuple[str, int, int, int]] | None = None, big_only: bool = False) -> dict:
    """The variants on the three targets: the 64-token / 32-adapter / rank-16 layer, 1 token per
    projection, the shapes moving >= 32 MB (evenly subsampled to max_shapes; 0: none; or exactly
    shapes_only, "big" rows whatever their bytes), plus
    each variant's fixed cost (64 tokens, no adapter in the batch, o projection). big_only: the shapes alone (no
    layer, 1-token or idle case; their keys are NaN)."""
    variants = variants or ["classic", "stream"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    t0 = time.perf_counter()
    dev = "cpu" if smoke else "cuda"
    print(f"compare: variants {variants} (reference: {variants[0]}); process default stream="
          f"{lora_meta.LORA_STREAM}", flush=True)
    res: dict = {"copy_bw_gbs": bw, "variants": variants}
    base = float("nan") if smoke or big_only else base_layer_us(64)
    res["base_layer_gemm_us_64tok"] = base
    cases: list[tuple[str, str, Case]] = []
    for p in [] if big_only else PROJECTIONS:
        cases.append(("layer", p, Case(p, 16, 32 if not smoke else 4, 64 if not smoke else 16, dev, smoke)))
    for p in [] if big_only else PROJECTIONS:
        cases.append(("1tok", p, Case(p, 16, 1, 1, dev, smoke)))
    if not big_only:
        cases.append(("idle", "o", Case("o", 16, 32 if not smoke else 4, 64 if not smoke else 16, dev, smoke,
                                        idle=True)))
    shapes = [sh for sh in sweep_shapes(smoke) if smoke or shape_bytes(*sh) >= 32e6]
    if shapes_only is not None:  # an explicit list (proj, rank, adapters, tokens), any size
        shapes = list(shapes_only)
    elif max_shapes is not None and len(shapes) > max_shapes:
        shapes = [] if max_shapes <= 0 else [shapes[round(i * (len(shapes) - 1) / (max_shapes - 1))]
                                             for i in range(max_shapes)] if max_shapes > 1 else shapes[:1]
    for sh in shapes:
        cases.append(("big", f"{sh[0]} r{sh[1]} L{sh[2]} T{sh[3]}", Case(*sh, dev, smoke)))
    print(f"  {len(cases)} cases built [{time.perf_counter() - t0:.0f} s]", flush=True)
    rows: dict[str, list[dict]] = {}
    ref_outs: list[tuple[torch.Tensor, torch.Tensor]] = []  # the first variant's (out, y0) per case
    for v in variants:
        rows[v] = []
        try:
            res[v] = _run_variant(v, variants, cases, rows, ref_outs, bw, base, t0)
        except Exception as exc:  # noqa: BLE001 - one variant failing (compile, launch) leaves the others
            print(f"VARIANT {v} FAILED after {len(rows[v])} cases: {exc!r}", flush=True)
            rows.pop(v)
            if v == variants[0]:
                raise
    variants = [v for v in variants if v in rows]
    res["rows"] = rows
    print(f"\nCOMPARE (same run; base layer GEMMs {base:.1f} us, copy {bw:.0f} GB/s)")
    print("  " + " " * 28 + "".join(f"{v:>13s}" for v in variants) + "   target")
    for key, target, fmt in [("lora_layer_us", "", "%.1f"), ("lora_layer_over_base", "<= 0.35", "%.3f"),
                             ("lora_1tok_us_per_proj", "<= 5", "%.2f"),
                             ("lora_32mb_bw_fraction_median", ">= 0.6", "%.3f"), ("idle_us", "", "%.2f")]:
        print(f"  {key:28s}" + "".join(f"{fmt % res[v][key]:>13s}" for v in variants) + f"   {target}")
    from loraserve.kernels.lora_expand import _PIPE_FAILED, _STREAM_FAILED

    res["stream_fell_back_to_classic"] = sorted(str(k) for k in _STREAM_FAILED)
    res["pipelined_loop_fell_back_to_rotating"] = sorted(str(k) for k in _PIPE_FAILED)
    if _STREAM_FAILED:
        print(f"  WARNING: the streaming expand failed to compile for {res['stream_fell_back_to_classic']}", flush=True)
    from loraserve.kernels.lora_expand import _BGMV_FAILED

    res["expand_bgmv_fell_back_to_stream"] = sorted(str(k) for k in _BGMV_FAILED)
    if _BGMV_FAILED:
        print(f"  WARNING: the BGMV expand failed for {res['expand_bgmv_fell_back_to_stream']}: those ran the streaming "
              "expand", flush=True)
    if _PIPE_FAILED:
        print(f"  WARNING: the pipelined column loop failed for {res['pipelined_loop_fell_back_to_rotating']}: "
              "those shapes ran the hand-rotated loop", flush=True)
    for c in cases:
        _use_variant(c[2], DEFAULT)  # leave the process defaults behind
    return res


def _run_variant(v: str, variants: list[str], cases: list, rows: dict, ref_outs: list, bw: float, base: float,
                 t0: float) -> dict:
    """Every case with variant v (appending to rows[v]); prints each row; returns the summary."""
    for i, (kind, name, c) in enumerate(cases):
        r = _run_case(c, VARIANTS[v], breakdown=kind in ("layer", "big"))
        out, y0 = r.pop("out"), r.pop("y0")
        if v == variants[0]:
            ref_outs.append((out, y0))
        r["max_abs_diff"] = (out - ref_outs[i][0]).abs().max().item()
        r["max_abs_delta"] = (ref_outs[i][0] - ref_outs[i][1]).abs().max().item()
        if kind == "big":
            r["bw_fraction"] = c.bytes / (r["us"] * 1e-6) / 1e9 / bw
        r.update(kind=kind, case=name, mb=c.bytes / 1e6)
        rows[v].append(r)
        extra = f"  shrink {r['shrink']:.1f} + expand {r['expand']:.1f}" if "shrink" in r else ""
        frac = f"  {r['bw_fraction']:.3f} of copy" if "bw_fraction" in r else ""
        print(f"  {v:9s} {kind:5s} {name:22s} {r['us']:7.2f} us ({r['path']}){frac}{extra}  max|diff| "
              f"{r['max_abs_diff']:.2e} (|delta| {r['max_abs_delta']:.2e}) repeat-equal {r['repeat_equal']} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    s = _summary(rows[v], base)
    print(f"SUMMARY {v}: layer {s['lora_layer_us']:.1f} us = {s['lora_layer_over_base']:.3f} of base (<= 0.35) "
          f"[{', '.join(f'{p} {u:.1f}' for p, u in s['lora_layer_us_per_proj'].items())}]; 1 token median "
          f"{s['lora_1tok_us_per_proj']:.2f} us (<= 5) [{', '.join(f'{p} {u:.2f}' for p, u in s['lora_1tok_us'].items())}]"
          f"; >=32MB median {s['lora_32mb_bw_fraction_median']:.3f} of copy (>= 0.6, {s['num_32mb_shapes']} shapes)"
          f"; idle (no adapter) {s['idle_us']:.2f} us; worst max|diff| {s['max_abs_diff']:.2e}; "
          f"all repeats equal {s['all_repeat_equal']}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return s


def _summary(rows: list[dict], base: float) -> dict:
    layer = {r["case"]: r["us"] for r in rows if r["kind"] == "layer"}
    one = {r["case"]: r["us"] for r in rows if r["kind"] == "1tok"}
    big = [r["bw_fraction"] for r in rows if r["kind"] == "big"]
    lay = sum(layer.values()) if layer else float("nan")
    return dict(lora_layer_us=lay, lora_layer_over_base=lay / base, lora_layer_us_per_proj=layer,
                lora_1tok_us_per_proj=statistics.median(one.values()) if one else float("nan"), lora_1tok_us=one,
                lora_32mb_bw_fraction_median=statistics.median(big) if big else float("nan"),
                num_32mb_shapes=len(big), idle_us=next((r["us"] for r in rows if r["kind"] == "idle"), float("nan")),
                max_abs_diff=max(r["max_abs_diff"] for r in rows),
                all_repeat_equal=all(r["repeat_equal"] for r in rows))


# The knob sweeps (--sweep-onelaunch / --sweep-stream / --sweep-bgmv / --sweep-xbgmv) live in lora_sweeps.py
# (files under ~500 lines); re-exported here for bench_lora_kernels.
from benchmarks.lora_sweeps import sweep_bgmv, sweep_onelaunch, sweep_stream, sweep_xbgmv  # noqa: E402,F401
