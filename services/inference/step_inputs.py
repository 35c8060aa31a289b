"""One step's model inputs, built with vectorised numpy ops into a persistent pinned buffer and moved
to the device with one non-blocking copy (the host never loops over tokens).

Packed layout of the int64 buffer (N tokens, B sequences, W = widest block table, S sampling rows,
P placeholders):  input_ids [N] | positions [N] | slots [N] | context_lens [B] | block_tables [B*W] |
token_slot [B] (LoRA slot per sequence, -1 = none) | sample_idx [S] | placeholder_dst [P] | placeholder_src [P]

Block tables: each sequence keeps a row of a persistent host table (BlockTableRows) that follows its
block list as it grows (a decode step appends a block to ~1 in 16 sequences), so a step gathers its
[B, W] tables with one fancy index instead of converting every block id of the batch from Python
(~2,500 ints at batch 64 x 600 tokens: 0.13 of the 0.19 ms the builder took, CPU).

Placeholders (overlapped scheduling): a sequence's last token may still be in flight, sampled by the
previous step; its input row is filled on the device from that step's sampled tokens
(input_ids[dst] = prev_tokens[src]), so the host never waits for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from operator import is_

import numpy as np
import torch


@dataclass
class StepInputs:
    """Device views of one step's inputs (see the module docstring for the layout)."""

    input_ids: torch.Tensor        # [N] int64
    positions: torch.Tensor        # [N] int64
    slot_mapping: torch.Tensor     # [N] int64 flat KV slot (block * block_size + offset)
    context_lens: torch.Tensor     # [B] int64 tokens in the cache after this step
    block_tables: torch.Tensor     # [B, W] int64, padded with `pad_block`
    token_slot: torch.Tensor       # [B] int64 LoRA slot of each sequence (-1: none)
    sample_idx: torch.Tensor       # [S] int64 flat row of each sampling sequence's last token
    context_lens_list: list[int]   # [B] host copy (attention picks its paths from it)
    sample_rows: list[int]         # [S] sequence index (in the batch) of each sampling row
    has_lora: bool = True          # host flag: some row has an adapter (decode graphs without LoRA otherwise)
    ids_positions_slots: torch.Tensor | None = None   # [3, N] view of the first three (one copy into graphs)
    placeholders_everywhere: bool = False   # every token is a placeholder, in row order (steady overlapped decode)
    build_id: int = 0                       # the builder's count of builds when this one was made
    tables_as_prev: bool = False            # block_tables equal the previous build's (same shape and values)
    num_adapters: int | None = None         # distinct LoRA slots of the step (general builds; None: not counted)


class BlockTableRows:
    """Host mirror of the sequences' block tables: one row per sequence, [rows, width] int64 padded with
    pad_block. A sequence's block list only grows while it lives (BlockManager appends; deallocation and
    preemption give it a new list), so a row is synced by appending the new tail, or rewritten when the
    list object changed. Rows of finished sequences are reused; the table grows when all rows are live.
    Which rows are stale is decided with numpy over the batch (entries filled, the list's id()); the list
    objects themselves are held (`owner`), so an id() cannot be reused by another list while its row lives."""

    def __init__(self, pad_block: int, rows: int = 64, width: int = 64):
        self.pad_block = pad_block
        self.table = np.full((rows, width), pad_block, dtype=np.int64)
        self.row_of: dict[int, int] = {}                  # seq_id -> row
        self.owner: list = [None] * rows                  # the block list object each row mirrors
        self.owner_id = np.zeros(rows + 1, dtype=np.int64)   # id() of it ([rows]: 0, what row -1 reads)
        self.filled = np.full(rows + 1, -1, dtype=np.int64)  # entries of that list copied into the row
        self.seq_of: list = [None] * rows                 # the sequence of each row (to reclaim finished ones)
        self.free = list(range(rows - 1, -1, -1))

    def gather(self, seqs: list, lens, width: int, lists: list | None = None, rows: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """([B, width] block tables of seqs, [B] their rows). lens[i] = len(seqs[i].block_table) <= width;
        lists: the block lists, when the caller has them; rows: the rows these sequences had in the previous
        gather when they are the same sequences with the same list objects (steady decode: no row lookup)."""
        lists = [s.block_table for s in seqs] if lists is None else lists
        lens = np.asarray(lens, dtype=np.int64)
        if rows is not None:   # same sequences, same lists: only growth to copy
            stale = self.filled[rows] != lens
        else:
            get = self.row_of.get
            rows = np.array([get(s.seq_id, -1) for s in seqs], dtype=np.int64)
            # row -1 reads the sentinel entries (filled -1): always stale
            stale = (self.filled[rows] != lens) | (self.owner_id[rows] != np.array([id(t) for t in lists], dtype=np.int64))
        if stale.any():
            rows = rows.copy()
            for i in np.flatnonzero(stale).tolist():
                rows[i] = self._sync(seqs[i], int(rows[i]), int(lens[i]), seqs)
        if width > self.table.shape[1]:
            self._widen(width)
        return self.table[rows, :width], rows

    def _sync(self, seq, r: int, n: int, live: list) -> int:
        if r < 0:
            r = self._take(live)
            self.row_of[seq.seq_id], self.seq_of[r] = r, seq
        if n > self.table.shape[1]:
            self._widen(n)
        bt, row = seq.block_table, self.table[r]
        start = int(self.filled[r]) if self.owner[r] is bt and 0 <= self.filled[r] <= n else 0
        row[start:n] = bt[start:n]
        if start == 0:
            row[n:] = self.pad_block         # a new list (after a preemption) may be shorter than the old one
        self.owner[r], self.owner_id[r], self.filled[r] = bt, id(bt), n
        return r

    def _take(self, live: list) -> int:
        if not self.free:      # reclaim rows of finished sequences and of sequences not in this step
            keep = {id(s) for s in live}
            for r, s in enumerate(self.seq_of):
                if s is not None and (s.is_finished or (id(s) not in keep and not s.block_table)):
                    self._release(r)
        if not self.free:
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.full_like(self.table, self.pad_block)])
            self.owner += [None] * old
            self.seq_of += [None] * old
            self.owner_id = np.concatenate([self.owner_id[:old], np.zeros(old + 1, dtype=np.int64)])
            self.filled = np.concatenate([self.filled[:old], np.full(old + 1, -1, dtype=np.int64)])
            self.free = list(range(2 * old - 1, old - 1, -1))
        return self.free.pop()

    def _release(self, r: int) -> None:
        del self.row_of[self.seq_of[r].seq_id]
        self.seq_of[r] = self.owner[r] = None
        self.owner_id[r], self.filled[r] = 0, -1
        self.table[r] = self.pad_block
        self.free.append(r)

    def _widen(self, width: int) -> None:
        rows, old = self.table.shape
        new = max(width, 2 * old)
        table = np.full((rows, new), self.pad_block, dtype=np.int64)
        table[:, :old] = self.table
        self.table = table


class StepInputBuilder:
    def __init__(self, block_size: int, pad_block: int, device: torch.device, width_multiple: int = 1,
                 max_width: int | None = None, with_lora: bool = True):
        """width_multiple: block tables are padded to a multiple of this many columns (at most max_width):
        the tables' row stride is an argument of the attention kernel, which Triton compiles a variant of
        for each of stride == 1, stride % 16 == 0 and any other stride; padded to 16 the stride is always
        the second, so no step meets a variant the start-up warm-up (warmup.py) did not compile."""
        self.block_size, self.pad_block, self.device = block_size, pad_block, device
        self.width_multiple, self.max_width = max(1, width_multiple), max_width
        self.with_lora = with_lora     # False: no sequence can have an adapter (no per-sequence look)
        self.block_tables = BlockTableRows(pad_block)
        self.pinned = device.type == "cuda"
        # two host buffers used in turn: the next step writes one while the other's copy may still run
        self._host: list[torch.Tensor | None] = [None, None]
        self._host_np: list[np.ndarray | None] = [None, None]   # numpy views of the host buffers
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._dev: torch.Tensor | None = None
        self._dev_size = 0
        self._turn = 0
        # sizes of the packed parts -> (device views, [host slice per turn]): a step whose sizes repeat (steady
        # decode) makes no torch slicing or split call; each costs 5-20 us on a busy host
        self._views: dict[tuple, tuple] = {}
        self._no_lora = np.full(64, -1, dtype=np.int64)
        self._arange = np.arange(64, dtype=np.int64)
        # the previous build (steady decode repeats it): its sequences, block lists and table rows, and whether it
        # was a decode step in which every row sampled (then each sequence's pending_row is its index there)
        self._last: tuple | None = None
        self.num_builds = 0

    def _buffers(self, size: int, read: bool = False) -> None:
        """Switch to the other host buffer (and grow both sides to `size`). read: the caller knows that buffer's
        last copy has been read (the overlapped engine loop: that copy fed the step before the one in flight,
        whose tokens were fetched), so no event wait: one CUDA call fewer a step (~15 us on the H200 host)."""
        k = self._turn = 1 - self._turn
        if not read and self._events[k] is not None:
            self._events[k].synchronize()   # its previous copy has been read (normally long done)
        host_np = self._host_np[k]
        if host_np is None or host_np.size < size:   # numpy sizes: no torch call
            if self._events[k] is not None:
                self._events[k].synchronize()   # the old buffer is freed: its copy must be done
            host = self._host[k] = torch.empty(max(size, 4096) * 2, dtype=torch.int64, pin_memory=self.pinned)
            self._host_np[k] = host.numpy()   # made once: a torch call costs tens of us on a busy host
            self._views.clear()
        if self.pinned and self._dev_size < size:
            self._dev = torch.empty(self._host_np[k].size, dtype=torch.int64, device=self.device)
            self._dev_size = self._host_np[k].size
            self._views.clear()

    def _device_views(self, sizes: tuple, size: int, N: int, B: int, W: int):
        """(flat device buffer of this step, its parts, block tables [B, W], ids/positions/slots [3, N]),
        made once per sizes on CUDA; on the CPU a fresh copy every step (the next build reuses the host buffer)."""
        k = self._turn
        if not self.pinned:
            flat = self._host[k][:size].clone()
            parts = flat.split(sizes)
            return flat, parts, parts[4].view(B, W), flat[:3 * N].view(3, N)
        entry = self._views.get(sizes)
        if entry is None:
            if len(self._views) > 4096:   # bounded: the shapes of a long run
                self._views.clear()
            flat = self._dev[:size]
            parts = flat.split(sizes)    # one call, not one slice per part
            entry = self._views[sizes] = (flat, parts, parts[4].view(B, W), flat[:3 * N].view(3, N), [None, None])
        hosts = entry[4]
        if hosts[k] is None:
            hosts[k] = self._host[k][:size]
        entry[0].copy_(hosts[k], non_blocking=True)
        event = self._events[k] = self._events[k] or torch.cuda.Event()
        event.record()
        return entry[:4]

    def _width(self, longest: int) -> int:
        """Columns of a step's block tables: the longest list, padded to width_multiple (at most max_width)."""
        w, m = max(longest, 1), self.width_multiple
        if m > 1:
            padded = -(-w // m) * m
            w = padded if self.max_width is None or padded <= self.max_width else max(w, self.max_width)
        return w

    def _build_steady(self, seqs: list, num_new_tokens: list[int]):
        """The previous build, one decode step on (None when this step is not that): the same sequences with the
        same block lists, every row sampled there and in flight now, the same table width. Each sequence then
        advanced by exactly one token (Scheduler.on_launched) and its next input is the token in flight at its own
        row, so this step's packed inputs are the previous ones with positions, slots and context lengths + 1,
        the ids zero (placeholders) and, for the ~1 in 16 rows that entered a new block, that row's table and slot
        rewritten: a few numpy ops for the whole batch instead of a pass over the sequences per field."""
        last_seqs, last_lists, rows, _, last_sizes, last_lens, last_width, has_lora = self._last
        B = len(seqs)
        if len(num_new_tokens) != sum(num_new_tokens) or seqs != last_seqs:
            return None
        block_lists = [s.block_table for s in seqs]
        if not all(map(is_, block_lists, last_lists)):
            return None
        lens_list = [len(t) for t in block_lists]
        W = self._width(max(lens_list))
        sizes = (B, B, B, B, B * W, B, B, B, B)
        if W != last_width or sizes != last_sizes:
            return None
        size = 3 * B + B * (W + 2) + 3 * B
        prev = self._host_np[self._turn][:size]
        self._buffers(size, read=True)
        buf = self._host_np[self._turn][:size]
        np.copyto(buf, prev)
        buf[:B] = 0                                  # ids: every token is in flight (placeholders)
        buf[B:4 * B] += 1                            # positions [B] | slots [B] | context lengths [B]
        t0 = 4 * B                                   # block tables [B * W], then token_slot [B]
        arange = self._arange[:B]
        buf[t0 + B * W + B:].reshape(3, B)[:] = arange   # sample_idx, placeholder dst, placeholder src: 0..B-1
        lens = np.array(lens_list, dtype=np.int64)
        pos = buf[B:2 * B]
        grown, crossed = np.flatnonzero(lens != last_lens), np.flatnonzero(pos % self.block_size == 0)
        if grown.size or crossed.size:   # rows that got a block since the last build / write a block's first slot
            table = self.block_tables
            for i in grown.tolist():
                table._sync(seqs[i], int(rows[i]), lens_list[i], seqs)
            if grown.size:
                buf[t0:t0 + B * W].reshape(B, W)[grown] = table.table[rows[grown], :W]
            if crossed.size:
                p = pos[crossed]
                buf[2 * B + crossed] = table.table[rows[crossed], p // self.block_size] * self.block_size
        self._last = (seqs, block_lists, rows, True, sizes, lens, W, has_lora)
        flat, view, block_tables, ids_positions_slots = self._device_views(sizes, size, B, B, W)
        inputs = StepInputs(view[0], view[1], view[2], view[3], block_tables, view[5], view[6],
                            buf[3 * B:4 * B].tolist(), arange.tolist(), has_lora, ids_positions_slots)
        inputs.placeholders_everywhere = True
        inputs.num_adapters = getattr(self, "_last_num_adapters", None)
        self.num_builds += 1
        inputs.build_id, inputs.tables_as_prev = self.num_builds, not grown.size
        return inputs, view[7], view[8]

    def build(self, seqs: list, num_new_tokens: list[int], prev_rows: dict[int, int] | bool | None = None
              ) -> tuple[StepInputs, torch.Tensor | None, torch.Tensor | None]:
        """seqs: the step's sequences; num_new_tokens: tokens each computes. prev_rows: seq_id -> row of the
        in-flight step's sampled tokens, for sequences whose last token is a placeholder (True: each
        sequence's pending_row, which the scheduler set when that step launched; None: no step in flight).
        Returns (inputs, placeholder_dst, placeholder_src) on the device."""
        if prev_rows is True and self._last is not None and self._last[3]:
            steady = self._build_steady(seqs, num_new_tokens)
            if steady is not None:
                return steady
        bs = self.block_size
        B = len(seqs)
        # one pass over the sequences per field: list comprehensions + np.array (measured faster on CPython 3.11
        # than np.fromiter(map(attrgetter)); every numpy call costs 0.5-4 us, so few of them)
        starts_list = [s.num_computed_tokens for s in seqs]
        starts = np.array(starts_list, dtype=np.int64)
        token_lists = [s.token_ids for s in seqs]
        totals = np.array([len(t) for t in token_lists], dtype=np.int64)
        block_lists = [s.block_table for s in seqs]
        lens_list = [len(t) for t in block_lists]
        lens = np.array(lens_list, dtype=np.int64)
        loras = [s.lora for s in seqs] if self.with_lora else None
        if loras is None or loras.count(None) == B:           # no adapter in the batch (the common case): a constant row
            if self._no_lora.size < B:
                self._no_lora = np.full(2 * B, -1, dtype=np.int64)
            token_slot, has_lora = self._no_lora[:B], False
        else:
            slot_list = [-1 if a is None or a.slot is None else a.slot for a in loras]
            token_slot = np.array(slot_list, dtype=np.int64)
            has_lora = bool((token_slot >= 0).any())
        W = self._width(max(lens_list))
        last_build = self._last
        # the same sequences (identity: Sequence compares by identity) with the same block-list objects as the
        # previous build: their table rows are known (a C-level compare instead of a row lookup per sequence)
        same = last_build is not None and seqs == last_build[0] and all(map(is_, block_lists, last_build[1]))
        tables, rows = self.block_tables.gather(seqs, lens, W, block_lists, last_build[2] if same else None)
        decode = len(num_new_tokens) == sum(num_new_tokens)
        if B > self._arange.size:
            self._arange = np.arange(2 * B, dtype=np.int64)
        arange = self._arange[:B]
        # steady overlapped decode: the previous build was this same decode batch, every row sampled, and that step
        # is the one in flight; each sequence's next input is then the token it is drawing (a placeholder), at
        # row i of its output (Scheduler.on_launched set pending_row = i): no per-sequence look at the tokens
        steady = same and decode and prev_rows is True and last_build[3]
        if decode:     # token i is sequence i's
            ids = np.zeros(B, dtype=np.int64) if steady else \
                np.array([t[a] for t, a in zip(token_lists, starts_list)], dtype=np.int64)
            positions, ends, last = starts, starts + 1, None               # last token of sequence i: row i
            slots = tables[arange, starts // bs] * bs + starts % bs
        else:  # [N] token ids: one C-level slice per sequence
            ids = np.fromiter(chain.from_iterable(t[a:a + k] for t, a, k in zip(token_lists, starts_list, num_new_tokens)),
                              dtype=np.int64)
            n = np.array(num_new_tokens, dtype=np.int64)
            ends = starts + n
            cum = np.cumsum(n)
            row = np.repeat(np.arange(B), n)                              # [N] sequence of each token
            positions = np.arange(ids.size) + (starts - (cum - n))[row]
            slots = tables[row, positions // bs] * bs + positions % bs
            last = cum - 1                                                # [B] row of each sequence's last token
        N = ids.size
        sample_rows = np.flatnonzero(ends == totals)                      # the chunk reaches the sequence's end
        sample_idx = sample_rows if last is None else last[sample_rows]
        dst = src = _EMPTY
        if steady and sample_rows.size == B:
            dst = src = arange
        elif prev_rows:
            pending = sample_rows[np.array([s.num_pending for s in seqs], dtype=np.int64)[sample_rows] > 0]
            dst = pending if last is None else last[pending]
            if prev_rows is True:
                src = np.array([s.pending_row for s in seqs], dtype=np.int64)[pending]
            else:
                src = np.array([prev_rows[seqs[i].seq_id] for i in pending.tolist()], dtype=np.int64)
            ids[ids < 0] = 0    # placeholders: overwritten on the device below
        P = dst.size
        parts = (ids, positions, slots, ends, tables.reshape(-1), token_slot, sample_idx, dst, src)
        sizes = (N, N, N, B, B * W, B, sample_idx.size, P, P)
        size = 3 * N + B * (W + 2) + sample_idx.size + 2 * P
        self._buffers(size, read=prev_rows is True)
        np.concatenate(parts, out=self._host_np[self._turn][:size])
        flat, view, block_tables, ids_positions_slots = self._device_views(sizes, size, N, B, W)
        inputs = StepInputs(view[0], view[1], view[2], view[3], block_tables, view[5], view[6],
                            ends.tolist(), sample_rows.tolist(), has_lora, ids_positions_slots)
        inputs.placeholders_everywhere = P == N and last is None   # decode: dst = pending rows = 0..N-1
        if has_lora:   # (the LoRA graphs may bound their grid by it: mixed_graphs.seg_bucket)
            inputs.num_adapters = len(set(slot_list)) - (-1 in slot_list)
        self._last_num_adapters = inputs.num_adapters   # a steady build's sequences (and so adapters) are these
        self._last = (seqs, block_lists, rows, decode and sample_rows.size == B, sizes, lens, W, has_lora)
        self.num_builds += 1
        inputs.build_id = self.num_builds
        return inputs, (view[7] if P else None), (view[8] if P else None)


_EMPTY = np.zeros(0, dtype=np.int64)
