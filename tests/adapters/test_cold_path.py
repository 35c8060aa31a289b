"""The fast cold path of adapter loading (issue 12) against an independent reference.

Reference: the safetensors library's own decoder (`safetensors.torch.load_file`, which copies) and
PEFT's scale folded in fp32 and rounded once. The fast path decodes in place (tensors are views of
the buffer the file was read into), folds scales in B's own dtype, in place, checks finiteness in
one integer pass over the whole file, and trusts a digest the caller verified.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.adapters import AdapterFormatError, load_adapter
from loraserve.adapters.adapter import fold_scale
from loraserve.adapters.bundle import artifact_digest, open_bundle
from loraserve.adapters.tensors import load_safetensors_bytes
from loraserve.adapters.testing import make_peft_adapter
from loraserve.adapters.writer import pack_dir


def reference(adapter_dir, scale: float, dtype: torch.dtype) -> dict:
    """(layer, module) -> (A, B * scale) from the library decoder, the fold in fp32 rounded once."""
    out = {}
    for key, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        parts = key.split(".")
        layer, module, which = int(parts[parts.index("layers") + 1]), parts[-3], parts[-2]
        a, b = out.get((layer, module), (None, None))
        if which == "lora_A":
            a = t.to(dtype)
        else:
            b = (t.to(torch.float32) * scale).to(dtype)
        out[(layer, module)] = (a, b)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packing", ["dir", "tar", "tar.gz", "zip"])
def test_fast_load_equals_the_library_decoder_and_fp32_fold(tmp_path, dtype, packing):
    src = make_peft_adapter(tmp_path / "src", modules=("q_proj", "v_proj", "down_proj"), r=4, alpha=12.0,
                            dtype=dtype, seed=3)
    path = src if packing == "dir" else pack_dir(src, tmp_path / f"a.{packing}", packing)
    got = load_adapter(path, serving_dtype=dtype)
    ref = reference(src, 12.0 / 4, dtype)
    assert set(got.weights) == set(ref)
    for k, (a, b) in got.weights.items():  # bit for bit
        assert a.dtype == dtype and torch.equal(a, ref[k][0]), k
        assert torch.equal(b.view(torch.uint8), ref[k][1].view(torch.uint8)), k
    assert got.digest == artifact_digest(path)
    if packing in ("dir", "tar"):  # read into one writable buffer: A and B are views of it, no copies
        ptrs = {t.untyped_storage().data_ptr() for ab in got.weights.values() for t in ab}
        assert len(ptrs) == 1
        assert got.peaks is not None  # bounds from the one pass over the file


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fold_in_own_dtype_is_the_fp32_fold_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    b = (torch.randn(4096, 16, generator=g) * torch.logspace(-6, 3, 16)).to(dtype)
    for scale in (2.0, 0.5, 1.7, 1 / 3, 3.3e-5, 250.0):
        want = (b.to(torch.float32) * scale).to(dtype)
        for in_place in (False, True):
            got = fold_scale(b.clone(), scale, in_place=in_place)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (scale, in_place)


def _safetensors(entries: list[tuple[str, int, int]], body: bytes) -> bytearray:
    header = {k: {"dtype": "F32", "shape": [(e - b) // 4], "data_offsets": [b, e]} for k, b, e in entries}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return bytearray(struct.pack("<Q", len(raw)) + raw + body)


def test_overlapping_holed_or_trailing_layouts_are_refused():
    """In-place decoding needs what the library enforces: tensors back to back, each byte once."""
    body = struct.pack("<4f", 1, 2, 3, 4)
    ok = load_safetensors_bytes(_safetensors([("x", 0, 8), ("y", 8, 16)], body), "ok.safetensors")
    assert ok["y"].tolist() == [3.0, 4.0] and ok.finite_peak == (True, 4.0)
    for entries, what in (([("x", 0, 8), ("y", 4, 12)], "starts at byte 4"),   # y overlaps x
                          ([("x", 0, 4), ("y", 8, 16)], "starts at byte 8"),    # a hole
                          ([("x", 0, 8)], "8 bytes after the last tensor")):
        with pytest.raises(AdapterFormatError, match=what):
            load_safetensors_bytes(_safetensors(entries, body), "bad.safetensors")


def test_non_finite_weights_are_found_by_the_one_pass(tmp_path):
    src = make_peft_adapter(tmp_path / "a", r=4, dtype=torch.bfloat16)
    f = src / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = sorted(tensors)[3]
    tensors[key][1, 2] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(AdapterFormatError, match="NaN"):
        load_adapter(src)


def test_given_digest_is_trusted_and_weights_read_through_alloc(tmp_path):
    src = make_peft_adapter(tmp_path / "a", r=4, dtype=torch.float16)
    tar = pack_dir(src, tmp_path / "a.tar", "tar")
    calls = []

    def alloc(n):  # what the engine passes on CUDA (pinned memory); here plain memory, counted
        calls.append(torch.empty(n, dtype=torch.uint8))
        return calls[-1]

    timings = {}
    got = load_adapter(tar, digest="sha256:" + "ab" * 32, alloc=alloc, timings=timings)
    assert got.digest == "sha256:" + "ab" * 32
    assert [t.numel() for t in calls] == [(src / "adapter_model.safetensors").stat().st_size]  # weights only
    # the factors are views of that very tensor's storage (not a foreign wrapper of its memory): a
    # pinned block's allocator then tracks the host->GPU copies made from it
    owner = calls[0].untyped_storage()._cdata  # the storage object itself, not just its address
    assert {t.untyped_storage()._cdata for ab in got.weights.values() for t in ab} == {owner}
    assert set(timings) == {"read_s", "digest_s", "parse_s", "range_s"}
    bundle = open_bundle(tar)
    bundle.read("adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="already handed out"):  # its buffer belongs to the first parse
        bundle.read("adapter_model.safetensors")


@pytest.mark.parametrize("piece", [777, 1 << 20])
def test_tar_bytes_in_pieces_load_like_the_file(tmp_path, piece):
    """A download's pieces (Chunks, never joined) parse to the file's weights; pieces untouched."""
    from loraserve.adapters.bundle import Chunks

    src = make_peft_adapter(tmp_path / "a", modules=("q_proj", "down_proj"), r=4, alpha=20.0, seed=4)
    tar = pack_dir(src, tmp_path / "a.tar", "tar")
    raw = tar.read_bytes()
    pieces = [raw[i:i + piece] for i in range(0, len(raw), piece)]
    digest = artifact_digest(tar)
    got = load_adapter(tar, data=Chunks(pieces), digest=digest, serving_dtype=torch.float32)
    ref = load_adapter(tar, serving_dtype=torch.float32)
    assert got.digest == ref.digest == digest and set(got.weights) == set(ref.weights)
    for k, (a, b) in ref.weights.items():
        assert torch.equal(got.weights[k][0], a) and torch.equal(got.weights[k][1], b), k
    assert b"".join(pieces) == raw  # scales were folded into a copy, not into the pieces
    with pytest.raises(AdapterFormatError, match="truncated|not a readable"):
        load_adapter(tar, data=Chunks([raw[:len(raw) // 2]]), digest=digest)
    with pytest.raises(ValueError, match="digest"):
        load_adapter(tar, data=Chunks(pieces))


def test_digest_stops_when_cancelled_and_a_refused_artifact_is_not_hashed_on(tmp_path):
    """The digest runs on a thread beside the parse; when the parse refuses the artifact, the
    thread must stop within a chunk, not read a (sparse, multi-GB) hostile file to its end."""
    import hashlib
    import threading
    import time

    from loraserve.adapters import AdapterFormatError, load_adapter
    from loraserve.adapters import loader as loader_mod
    from loraserve.adapters.bundle import DigestCancelled

    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * (3 << 20))
    assert artifact_digest(small) == "sha256:" + hashlib.sha256(small.read_bytes()).hexdigest()
    stop = threading.Event()
    stop.set()
    with pytest.raises(DigestCancelled):
        artifact_digest(small, stop)

    big = tmp_path / "huge.tar"          # 8 GiB sparse: not a tar, refused at once by the parser
    with open(big, "wb") as f:
        f.truncate(8 << 30)
    with pytest.raises(AdapterFormatError):
        load_adapter(big)
    # both hashing workers must be free again shortly (hashing 8 GiB would take many seconds): two
    # tasks that can only finish when they run at the same time, one on each worker
    t0 = time.perf_counter()
    both = threading.Barrier(2)
    futures = [loader_mod._DIGESTS.submit(both.wait, 3.0) for _ in range(2)]
    for fut in futures:
        fut.result(timeout=10)
    assert time.perf_counter() - t0 < 3.0


def test_threaded_in_place_folds_equal_fold_scale_bit_for_bit(monkeypatch):
    """fold_scales_in_place spreads the folds of a large adapter over threads: every B must equal
    fold_scale's one-rounding product exactly (bf16, fp16, fp32; odd scales; uneven sizes)."""
    import torch

    from loraserve.adapters import adapter as adapter_mod

    monkeypatch.setattr(adapter_mod, "_FOLD_THREADS", 3)
    g = torch.Generator().manual_seed(0)
    items, refs = [], []
    for i, dtype in enumerate([torch.bfloat16, torch.float16, torch.float32] * 6):
        b = torch.randn(4096 + 517 * i, 32, generator=g).to(dtype)   # 18 factors, ~4.9M elements in all
        scale = (0.37, 2.0, 1.3333, 5.5)[i % 4]
        refs.append(adapter_mod.fold_scale(b.clone(), scale))
        items.append((b, scale))
    assert sum(b.numel() for b, _ in items) >= 4 << 20  # enough work for the threads
    adapter_mod.fold_scales_in_place(items)
    for (b, _), ref in zip(items, refs):
        assert torch.equal(b, ref)
