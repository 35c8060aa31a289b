"""GPU tier of the adapter cache: `num_slots` adapter slots packed for the batched kernels.

For each fused projection p of the model (qkv_proj, o_proj, gate_up_proj, down_proj):
    a[p]: [num_layers, L, S_p, R, in_p]   A of each slice (q/k/v, gate/up), rows >= rank zero
    b[p]: [num_layers, L, N_p, R]         B of all slices stacked on rows (scale folded in)
    slice_offsets[p]: [S_p + 1] int32     row offsets of the slices in N_p
    scale[p]: [num_layers, L, N_p] fp32   DoRA's g = m / ||W + B@A||_row per output feature;
                                          1 for plain LoRA slots and for modules a DoRA adapter
                                          does not adapt (the kernels multiply every adapted
                                          token's row by it: x1.0 is exact, so plain LoRA is
                                          bit-identical, and one captured graph serves both)
    shift[p]: [num_layers, L, N_p] fp32   (1 - g) * bias, added after the scale, only for
                                          projections with a bias (Qwen2 qkv): DoRA leaves the
                                          bias unscaled; 0 where g = 1
    ranks: [L] int32                      real rank of the adapter in each slot
Projections that no enabled module uses get no buffers at all. With only some modules of a fused
projection enabled (q_proj + v_proj), S_p counts the enabled ones: a disabled module's columns belong
to the slice before it (the first slice if none) with zero B rows (lora_slices, MERGE_SLICES).

Rank packing (LORASERVE_RANK_PACKING=auto, the default: packed when max_lora_rank >= 32; 1: always; 0: max-rank
slots; granule G = LORASERVE_RANK_GRANULE, 8): a "slot" is a
granule of G rank rows, and an adapter of rank r takes span(r) = next_pow2(ceil(r / G)) granules
aligned to span(r) (a buddy layout: any two adapters' blocks are nested or apart), so a rank-8
adapter costs 8 rows, not max_rank. a[p] and b[p] are then strided views of pools

    pool_a[p]: [num_layers, S_p, P, in_p]    pool_b[p]: [num_layers, P, N_p]    P = L*G + pad

with slot v's rows at v*G .. v*G + R - 1 (a[p].stride(1) = G*in_p, b[p].stride(1) = G*N_p): the
adapter's B is one block of rank rows, each contiguous over N (b[p] strides: n 1, rank N_p). The
first layout, [N_p, P] (rank axis contiguous), put an adapter's consecutive output rows P
elements (128 KB) apart: in the final H200 run (2026-11-30) 32 resident adapters decoded at 0.36
of the no-adapter throughput with it (unmeasured with this layout, and with packing off). The
kernels index a slot through its strides and mask rows and columns by ranks[v], so they read
only the adapter's own rows (the streaming expand reads B in whole 16-wide chunks up to
ceil16(rank) and multiplies the extra columns by masked zeros: finite weights of the neighbour
add nothing). `pad` keeps the last slot's R-row view inside the pool. scale/shift/ranks stay per
slot (granule); only an adapter's first granule is ever a token's slot.
"""
from __future__ import annotations

import logging
import os

import torch

from loraserve.adapters import LoraAdapter

from ..models.llama import PROJ_SLICES, ModelArgs

log = logging.getLogger(__name__)


# True: always packed, False: max-rank slots, None (auto, the default): packed when max_lora_rank >= PACK_MIN_RANK,
# where a rank-8 adapter in a max-rank slot would waste >= 3/4 of it. Below it packing saves at most half a slot and
# its kernel path costs more (H200, 2026-12-01, bench_lora_decode 8 layers, batch 64, 32 r16 adapters, max rank 16:
# LoRA 56.0 us a layer with max-rank slots, 76.8 packed).
_PACK_ENV = os.environ.get("LORASERVE_RANK_PACKING", "auto").strip().lower()
RANK_PACKING: bool | None = None if _PACK_ENV == "auto" else _PACK_ENV == "1"
PACK_MIN_RANK = int(os.environ.get("LORASERVE_RANK_PACKING_MIN_RANK", "32"))
RANK_GRANULE = int(os.environ.get("LORASERVE_RANK_GRANULE", "8"))
# slot loads: one host->GPU copy per adapter block (_bulk_copy); 0: two copies per (layer, module)
BULK_COPY = os.environ.get("LORASERVE_SLOT_BULK_COPY", "1") != "0"


# A fused projection whose enabled modules are a subset (bench_churn's q_proj + v_proj in qkv_proj) keeps one
# A slice per ENABLED module only: a disabled module's columns join the slice before it (or the first one),
# where its B rows stay zero. The shrink then computes 2 slices of qkv, not 3 (the k slice was all-zero A
# rows read from HBM: a third of the shrink's bytes and programs); the expand still covers every column.
# LORASERVE_LORA_MERGE_SLICES=0: one slice per module as before.
MERGE_SLICES = os.environ.get("LORASERVE_LORA_MERGE_SLICES", "1") != "0"


def lora_slices(modules: tuple[str, ...], outs: list[int], enabled: set[str],
                merge: bool | None = None) -> tuple[list[int], dict[str, tuple[int, int]]]:
    """(slice column offsets [S + 1], {module: (slice, its first column)}) of one fused projection whose
    modules have `outs` output columns each: a slice per module, or with merging (MERGE_SLICES) a slice per
    enabled module covering the disabled ones after it (the first also those before it)."""
    merge = MERGE_SLICES if merge is None else merge
    cols = [0]
    for o in outs:
        cols.append(cols[-1] + o)
    keep = [i for i, m in enumerate(modules) if m in enabled] if merge else list(range(len(modules)))
    keep = keep or list(range(len(modules)))
    offsets = [0] + [cols[i] for i in keep[1:]] + [cols[-1]]
    where = {}
    for i, m in enumerate(modules):
        s = max([k for k, j in enumerate(keep) if j <= i], default=0)
        where[m] = (s, cols[i])
    return offsets, where


def slot_granule(max_rank: int, packed: bool | None = None) -> int:
    """Rank rows per slot: max_rank, or the packing granule (at most max_rank)."""
    packed = RANK_PACKING if packed is None else packed
    if packed is None:
        packed = max_rank >= PACK_MIN_RANK
    return max(1, min(RANK_GRANULE, max_rank)) if packed else max_rank


def slot_span(rank: int, granule: int) -> int:
    """Slots an adapter of `rank` takes: ceil(rank / granule) rounded up to a power of two."""
    k = max(1, -(-rank // granule))
    return 1 << (k - 1).bit_length()


class DeviceSlots:
    def __init__(self, args: ModelArgs, enabled: set[str], num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, packed: bool | None = None):
        """num_slots: granules when packed (see the module docstring), else max_rank-wide slots."""
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        self.granule = slot_granule(max_rank, packed)
        self.packed = self.granule < max_rank
        self._pools: list[torch.Tensor] = []   # the packed layout's backing buffers
        shapes = args.lora_module_shapes()
        if self.packed and not _packing_fits_int32(shapes, enabled, num_slots * self.granule + max(max_rank, 16)):
            # the kernels compute offsets within one layer in int32 (n * stride_bn, s * stride_as)
            log.warning("rank packing off: %d slots of %d rows put the pools' per-layer offsets past int32",
                        num_slots, self.granule)
            self.num_slots = num_slots = -(-num_slots * self.granule // max_rank)   # the same memory, max-rank slots
            self.granule, self.packed = max_rank, False
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self.slice_offsets: dict[str, torch.Tensor] = {}
        self.scale: dict[str, torch.Tensor] = {}
        self.shift: dict[str, torch.Tensor] = {}
        self.dora_slot: dict[str, torch.Tensor] = {}   # [num_layers, L] int32: 1 where the slot holds DoRA vectors
        self.slice_index: dict[str, tuple[str, int, int]] = {}  # module -> (proj, slice, row offset)
        L, n_layers = num_slots, args.num_hidden_layers
        for proj, modules in PROJ_SLICES.items():
            if not enabled & set(modules):
                continue
            in_f = shapes[modules[0]][0]
            offsets, where = lora_slices(modules, [shapes[m][1] for m in modules], enabled)
            S = len(offsets) - 1   # A slices (one per enabled module when merged)
            if self.packed:
                N, G = offsets[-1], self.granule
                rows = L * G + max(max_rank, 16)   # the last slot's R-row view (and 16-wide B reads) stay inside
                pool_a = torch.zeros(n_layers, S, rows, in_f, dtype=dtype, device=device)
                pool_b = torch.zeros(n_layers, rows, N, dtype=dtype, device=device)   # rank rows, each over N
                self._pools += [pool_a, pool_b]
                self.a[proj] = pool_a.as_strided((n_layers, L, S, max_rank, in_f),          # [layers, L, S, R, in]
                                                 (S * rows * in_f, G * in_f, rows * in_f, in_f, 1))
                self.b[proj] = pool_b.as_strided((n_layers, L, N, max_rank), (rows * N, G * N, 1, N))  # [layers, L, N, R]
            else:
                self.a[proj] = torch.zeros(n_layers, L, S, max_rank, in_f, dtype=dtype, device=device)
                self.b[proj] = torch.zeros(n_layers, L, offsets[-1], max_rank, dtype=dtype, device=device)
            self.scale[proj] = torch.ones(n_layers, L, offsets[-1], dtype=torch.float32, device=device)
            self.dora_slot[proj] = torch.zeros(n_layers, L, dtype=torch.int32, device=device)  # (LoRABatch: scale_on)
            if _has_bias(args, proj):
                self.shift[proj] = torch.zeros(n_layers, L, offsets[-1], dtype=torch.float32, device=device)
            self.slice_offsets[proj] = torch.tensor(offsets, dtype=torch.int32, device=device)
            for m in modules:
                self.slice_index[m] = (proj, *where[m])
        self.ranks = torch.zeros(L, dtype=torch.int32, device=device)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: torch.cuda.Event | None = None
        self._staging: torch.Tensor | None = None   # GPU copy of the last bulk-loaded host block (_bulk_copy)
        self._layer_indices: dict[tuple, torch.Tensor] = {}  # file order -> layer index (_bulk_copy)

    @staticmethod
    def bytes_per_slot(args: ModelArgs, enabled: set[str], max_rank: int, dtype: torch.dtype,
                       rows: int | None = None) -> int:
        """GPU bytes of one slot of `rows` rank rows (default max_rank; the packing granule when packed)."""
        rows = max_rank if rows is None else rows
        shapes = args.lora_module_shapes()
        elems = scale_bytes = 0
        for proj, modules in PROJ_SLICES.items():
            if enabled & set(modules):  # a fused buffer holds B of every module once any is enabled, A per slice
                offsets, _ = lora_slices(modules, [shapes[m][1] for m in modules], enabled)
                elems += ((len(offsets) - 1) * shapes[modules[0]][0] + offsets[-1]) * rows
                scale_bytes += sum(shapes[m][1] for m in modules) * 4 * (1 + _has_bias(args, proj))  # g (+ shift)
        return args.num_hidden_layers * (elems * torch.finfo(dtype).bits // 8 + scale_bytes)

    def span(self, rank: int) -> int:
        """Slots an adapter of `rank` takes (1 unless packed)."""
        return slot_span(rank, self.granule) if self.packed else 1

    @property
    def nbytes(self) -> int:
        weights = self._pools if self.packed else [*self.a.values(), *self.b.values()]
        return sum(t.numel() * t.element_size() for t in (*weights, *self.scale.values(), *self.shift.values()))

    def load(self, slot: int, adapter: LoraAdapter) -> int:
        """Copy `adapter` into `slot` (on the side stream on CUDA); returns bytes copied."""
        stream = self.copy_stream
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        copied = 0
        rows = self.span(adapter.rank) * self.granule if self.packed else self.max_rank  # this adapter's rows only
        with ctx:
            for proj in self.a:
                self.a[proj][:, slot, :, :rows].zero_()
                self.b[proj][:, slot, :, :rows].zero_()
                self.scale[proj][:, slot].fill_(1.0)
                self.dora_slot[proj][:, slot].zero_()
                if proj in self.shift:
                    self.shift[proj][:, slot].zero_()
            if not self._bulk_copy(slot, adapter.weights):
                for (layer, module), (a, b) in adapter.weights.items():
                    proj, s, off = self.slice_index[module]
                    r = a.shape[0]
                    self.a[proj][layer, slot, s, :r].copy_(a, non_blocking=True)
                    self.b[proj][layer, slot, off:off + b.shape[0], :r].copy_(b, non_blocking=True)
            copied += sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                          for a, b in adapter.weights.values())
            # DoRA vectors; objects without them (the TP workers' slot loads) are plain LoRA
            for (layer, module), g in getattr(adapter, "dora_scales", {}).items():
                proj, _, off = self.slice_index[module]
                self.scale[proj][layer, slot, off:off + g.shape[0]].copy_(g, non_blocking=True)
                self.dora_slot[proj][layer, slot].fill_(1)
                copied += g.numel() * g.element_size()
            for (layer, module), c in getattr(adapter, "dora_shifts", {}).items():
                proj, _, off = self.slice_index[module]
                self.shift[proj][layer, slot, off:off + c.shape[0]].copy_(c, non_blocking=True)
                copied += c.numel() * c.element_size()
            self.ranks[slot] = adapter.rank
            if stream is not None:
                self._pending = torch.cuda.Event()
                self._pending.record(stream)
        return copied

    def _bulk_copy(self, slot: int, weights: dict) -> bool:
        """The weights' pinned host block in ONE host->GPU copy (into a staging buffer), then one
        strided device copy per (module, A|B) over all layers: ~20 CUDA calls instead of two per
        (layer, module) (448 for an 8B adapter on every module: ~8 ms of the engine thread per
        load). Applies when every factor is a contiguous view of one pinned block in the serving
        dtype (a file read into pinned memory, a staged copy) and each module's layers are
        consecutive and of one shape (at one stride in the block: one view; else one stack kernel
        per module and factor); else False, nothing done.
        Runs on the copy stream, which orders the staging buffer's reuse."""
        if not BULK_COPY or self.copy_stream is None or not weights:
            return False
        first = next(iter(weights.values()))[0]
        if not _is_pinned(first):
            return False
        base, esize = first.untyped_storage().data_ptr(), first.element_size()
        by_module: dict[str, list] = {}
        lo = hi = first.data_ptr()
        for (layer, module), (a, b) in weights.items():
            for t in (a, b):
                if t.dtype != self.dtype or not t.is_contiguous() or t.untyped_storage().data_ptr() != base \
                        or (t.data_ptr() - base) % esize:
                    return False
                lo, hi = min(lo, t.data_ptr()), max(hi, t.data_ptr() + t.numel() * esize)
            by_module.setdefault(module, []).append((layer, a, b))
        plans = []   # (module, first layer, [A of each layer], [B of each layer])
        for module, rows in by_module.items():
            rows.sort(key=lambda row: row[0])
            if [row[0] for row in rows] != list(range(rows[0][0], rows[0][0] + len(rows))):
                return False
            if any(row[1].shape != rows[0][1].shape or row[2].shape != rows[0][2].shape for row in rows):
                return False
            plans.append((module, rows[0][0], [row[1] for row in rows], [row[2] for row in rows]))
        n = (hi - lo) // esize
        host = torch.empty(0, dtype=self.dtype).set_(first.untyped_storage(), (lo - base) // esize, (n,), (1,))
        if self._staging is None or self._staging.numel() < n:
            self._staging = torch.empty(n, dtype=self.dtype, device=self.device)   # [elements of the block]
        staging = self._staging
        staging[:n].copy_(host, non_blocking=True)
        for module, l0, a_list, b_list in plans:
            proj, s, off = self.slice_index[module]
            (r, n_in), (n_out, _) = a_list[0].shape, b_list[0].shape
            L = len(a_list)

            def place(dst, ts, shape):  # dst [L, *shape] <- the factors of every layer, from the staging buffer
                offsets = [(t.data_ptr() - lo) // esize for t in ts]
                step = offsets[1] - offsets[0] if L > 1 else 0
                if step >= 0 and all(o == offsets[0] + k * step for k, o in enumerate(offsets)):
                    dst.copy_(staging.as_strided((L, *shape), (step, shape[1], 1), offsets[0]))   # one view
                    return
                # layers not at one stride (a safetensors file sorts keys as text: layer 10 before 2), but in
                # the file's order they are: one view in that order, scattered to the layers by one index_copy_
                # (a stack of L views cost ~0.2 ms of host time per module and factor: 3 ms of an 8B load)
                order = sorted(range(L), key=offsets.__getitem__)
                step = offsets[order[1]] - offsets[order[0]]
                if step > 0 and all(offsets[k] == offsets[order[0]] + j * step for j, k in enumerate(order)):
                    src = staging.as_strided((L, *shape), (step, shape[1], 1), offsets[order[0]])  # file order
                    dst.index_copy_(0, self._layer_index(order), src)
                    return
                dst.copy_(torch.stack([staging.as_strided(shape, (shape[1], 1), o) for o in offsets]))
            place(self.a[proj][l0:l0 + L, slot, s, :r], a_list, (r, n_in))               # [L, r, in]
            place(self.b[proj][l0:l0 + L, slot, off:off + n_out, :r], b_list, (n_out, r))  # [L, out, r]
        return True

    def _layer_index(self, order: list[int]) -> torch.Tensor:
        """[L] int64 on the device: order as an index (kept: every adapter file of this model has the same)."""
        key = tuple(order)
        found = self._layer_indices.get(key)
        if found is None:
            found = self._layer_indices[key] = torch.tensor(order, dtype=torch.int64).to(self.device)
        return found

    def wait_for_copies(self) -> None:
        """Make the compute stream wait for slot loads issued so far (no host sync)."""
        if self._pending is not None:
            torch.cuda.current_stream(self.device).wait_event(self._pending)
            self._pending = None


def _is_pinned(t: torch.Tensor) -> bool:   # (a CPU test replaces it: pinned memory needs CUDA)
    return t.is_pinned()


def _packing_fits_int32(shapes: dict, enabled: set[str], rows: int) -> bool:
    """Every per-layer offset of the packed pools stays below 2**31 elements."""
    for proj, modules in PROJ_SLICES.items():
        if enabled & set(modules):
            n_out, in_f = sum(shapes[m][1] for m in modules), shapes[modules[0]][0]
            if max(n_out * rows, len(modules) * rows * in_f) >= 2 ** 31:
                return False
    return True


def _has_bias(args: ModelArgs, proj: str) -> bool:
    """Whether the model's `proj` has a bias (models/llama.py: only qkv_proj, with attention_bias)."""
    return proj == "qkv_proj" and bool(args.attention_bias)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
