"""The vectorised step-input builder against the per-token Python loop it replaced (the reference),
on random batches of prefill chunks, decode rows and in-flight placeholders."""
from __future__ import annotations

import random

import pytest
import torch

from loraserve.config import SamplingParams
from loraserve.inference.sequence import PLACEHOLDER, Sequence
from loraserve.inference.step_inputs import StepInputBuilder

BS, PAD = 16, 999


def reference(seqs, num_new_tokens):
    """The old ModelRunner.run loop: token by token."""
    ids, pos, slots, ctx, sample_idx, offset = [], [], [], [], [], 0
    for s, n in zip(seqs, num_new_tokens):
        start = s.num_computed_tokens
        ids.extend(s.token_ids[start:start + n])
        pos.extend(range(start, start + n))
        slots.extend(s.block_table[p // BS] * BS + p % BS for p in range(start, start + n))
        ctx.append(start + n)
        offset += n
        if start + n == s.num_tokens:
            sample_idx.append(offset - 1)
    width = max(len(s.block_table) for s in seqs)
    tables = [s.block_table + [PAD] * (width - len(s.block_table)) for s in seqs]
    return ids, pos, slots, ctx, tables, sample_idx


@pytest.mark.parametrize("seed", range(6))
def test_builder_matches_the_per_token_loop(seed):
    rng = random.Random(seed)
    seqs, n_new, prev_rows, free = [], [], {}, list(range(500))
    rng.shuffle(free)
    for i in range(rng.randint(1, 12)):
        total = rng.randint(1, 90)
        s = Sequence(f"r{i}", [rng.randrange(300) for _ in range(total)], SamplingParams())
        kind = rng.choice(["prefill", "chunk", "decode", "placeholder"])
        if kind == "prefill":
            s.num_computed_tokens, n = 0, total
        elif kind == "chunk":
            s.num_computed_tokens = rng.randint(0, total - 1)
            n = rng.randint(1, total - s.num_computed_tokens)
        else:
            if kind == "placeholder":
                s.add_placeholder(row=rng.randrange(8))
                prev_rows[s.seq_id] = s.pending_row
            s.num_computed_tokens, n = s.num_tokens - 1, 1
        s.block_table = [free.pop() for _ in range(-(-(s.num_computed_tokens + n) // BS) + rng.randint(0, 1))]
        s.lora = None
        seqs.append(s)
        n_new.append(n)
    inp, dst, src = StepInputBuilder(BS, PAD, torch.device("cpu")).build(seqs, n_new, prev_rows)
    ids, pos, slots, ctx, tables, sample_idx = reference(seqs, n_new)
    got_ids = inp.input_ids.tolist()
    for i, t in enumerate(ids):
        assert got_ids[i] == (0 if t == PLACEHOLDER else t)
    assert inp.positions.tolist() == pos and inp.slot_mapping.tolist() == slots
    assert inp.context_lens.tolist() == ctx == inp.context_lens_list
    assert inp.block_tables.tolist() == tables and inp.sample_idx.tolist() == sample_idx
    holes = [i for i, t in enumerate(ids) if t == PLACEHOLDER]
    if holes:   # each placeholder row is fed from its sequence's row of the previous step
        assert dst.tolist() == holes
        owners = [s for s in seqs if s.num_pending]
        assert src.tolist() == [prev_rows[s.seq_id] for s in owners]
    else:
        assert dst is None and src is None
    # prev_rows=True: each sequence's pending_row instead of the dict (what ModelRunner passes)
    _, dst2, src2 = StepInputBuilder(BS, PAD, torch.device("cpu")).build(seqs, n_new, True)
    assert (dst2 is None) == (dst is None)
    if dst is not None:
        assert dst2.tolist() == dst.tolist() and src2.tolist() == src.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_block_table_rows_follow_the_lists_across_steps(seed):
    """The persistent rows (BlockTableRows) over many steps of one builder: block lists grow, are replaced
    (preemption: a new, shorter list), sequences finish and new ones take their rows, the table grows past
    its first rows and width; every step's tables equal the padded lists."""
    from loraserve.inference.sequence import SequenceStatus
    from loraserve.inference.step_inputs import BlockTableRows

    rng = random.Random(seed)
    rows = BlockTableRows(PAD, rows=4, width=2)
    live: list[Sequence] = []
    next_block = iter(range(10**6))
    for step in range(60):
        for _ in range(rng.randint(0, 3)):                      # arrivals
            s = Sequence(f"s{step}-{len(live)}", [1], SamplingParams())
            s.block_table = [next(next_block) for _ in range(rng.randint(0, 3))]
            live.append(s)
        for s in list(live):
            event = rng.random()
            if event < 0.1:                                     # finished: its row may be reused
                s.status = SequenceStatus.FINISHED
                live.remove(s)
            elif event < 0.2:                                   # preempted and re-admitted: a new list
                s.block_table = [next(next_block) for _ in range(rng.randint(0, 2))]
            elif event < 0.6:                                   # grew
                s.block_table.extend(next(next_block) for _ in range(rng.randint(1, 4)))
        batch = [s for s in live if rng.random() < 0.8]         # some sit a step out (waiting, skipped)
        if not batch:
            continue
        lens = [len(s.block_table) for s in batch]
        width = max(max(lens), 1)
        got, _ = rows.gather(batch, lens, width)
        assert got.tolist() == [s.block_table + [PAD] * (width - len(s.block_table)) for s in batch]
    assert rows.table.shape[0] > 4 and rows.table.shape[1] > 2    # it grew both ways


def test_placeholders_everywhere_is_the_identity_scatter():
    """A decode step whose every row waits for the in-flight token (steady overlapped decode) is flagged, and
    its placeholder rows are then 0..N-1 in order (the runner gathers straight into the ids); a step with one
    row known on the host is not."""
    seqs, prev_rows = [], {}
    for i in range(5):
        s = Sequence(f"r{i}", list(range(10 + i)), SamplingParams())
        s.add_placeholder(row=4 - i)
        prev_rows[s.seq_id] = s.pending_row
        s.num_computed_tokens = s.num_tokens - 1
        s.block_table = [i]
        s.lora = None
        seqs.append(s)
    builder = StepInputBuilder(BS, PAD, torch.device("cpu"))
    inp, dst, src = builder.build(seqs, [1] * 5, prev_rows)
    assert inp.placeholders_everywhere and dst.tolist() == list(range(5)) and src.tolist() == [4, 3, 2, 1, 0]
    seqs[2].resolve_placeholder(7)
    inp, dst, src = builder.build(seqs, [1] * 5, prev_rows)
    assert not inp.placeholders_everywhere and dst.tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("width_multiple", [1, 16])
@pytest.mark.parametrize("seed", range(3))
def test_steady_decode_fast_path_equals_a_fresh_build(seed, width_multiple):
    """Overlapped decode repeats one batch step after step; the builder then derives the step's inputs from the
    previous build's (_build_steady: positions, slots and lengths + 1, rows entering a new block rewritten). Over many steps
    (blocks appended, a sequence leaving, one joining, a step without a step in flight) every output equals
    what a fresh builder (no previous build) gives for the same state."""
    rng = random.Random(seed)
    blocks = iter(range(10**6))
    seqs = []
    for i in range(6):
        s = Sequence(f"r{i}", [rng.randrange(300) for _ in range(rng.randint(3, 40))], SamplingParams())
        s.num_computed_tokens = s.num_tokens - 1
        s.block_table = [next(blocks) for _ in range(-(-s.num_tokens // BS))]
        s.lora = None
        seqs.append(s)
    builder = StepInputBuilder(BS, PAD, torch.device("cpu"), width_multiple)
    # the decode graphs' static buffers, fed by these steps (a CPU stand-in for the replay): the block-table copy
    # skipped when the tables equal the previous build's must leave them equal to every step's tables
    from loraserve.inference.cuda_graphs import CudaGraphRunner

    class Replay:
        def replay(self):
            pass
    graphs = CudaGraphRunner(None, torch.device("cpu"), 8, 64, PAD, BS)
    graphs.graphs = {(b, False): (Replay(), torch.zeros(b, 1), None) for b in graphs.buckets}
    in_flight = False
    for step in range(40):
        if step == 15:
            seqs = seqs[1:]                                           # one finished
        if step == 25:                                                # one joins (decoding, its token on the host)
            s = Sequence("late", [7, 8, 9], SamplingParams())
            s.num_computed_tokens, s.block_table, s.lora = 2, [next(blocks)], None
            seqs = seqs + [s]
        if step == 32:
            in_flight = False                                         # the loop went serial for a step
        for s in seqs:                                                # the scheduler's block growth
            if s.num_computed_tokens + 1 > len(s.block_table) * BS:
                s.block_table.append(next(blocks))
        prev = True if in_flight else None
        got = builder.build(seqs, [1] * len(seqs), prev)
        want = StepInputBuilder(BS, PAD, torch.device("cpu"), width_multiple).build(seqs, [1] * len(seqs), prev)
        for key, a in got[0].__dict__.items():
            if key in ("build_id", "tables_as_prev"):   # the builder's own history
                continue
            b = want[0].__dict__[key]
            assert (a.tolist() if isinstance(a, torch.Tensor) else a) == (b.tolist() if isinstance(b, torch.Tensor) else b)
        assert [None if t is None else t.tolist() for t in got[1:]] == [None if t is None else t.tolist() for t in want[1:]]
        inp, n, width = got[0], len(seqs), got[0].block_tables.shape[1]
        graphs.run(inp)
        assert graphs.block_tables[:n, :width].tolist() == inp.block_tables.tolist()
        assert graphs.context_lens[:n].tolist() == inp.context_lens.tolist()
        for s in seqs:                                                # the step in flight resolves (overlap: later)
            if s.num_pending:
                s.resolve_placeholder(rng.randrange(300))
        for row, s in enumerate(seqs):                                # Scheduler.on_launched
            s.num_computed_tokens += 1
            s.add_placeholder(row)
        in_flight = True
