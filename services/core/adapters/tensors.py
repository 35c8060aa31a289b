"""Decoding tensor files safely: safetensors (header checked first) and torch.load(weights_only=True).

Both return a flat dict[str, Tensor] on CPU, or raise AdapterFormatError saying what is wrong.
"""
from __future__ import annotations

import contextvars
import io
import json
import math
import zipfile

import torch
from safetensors.torch import load as safetensors_load

from .archives import STAGED_IN_PROGRESS
from .errors import AdapterFormatError, shorten

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The library allows 100 MB, but parsing that much JSON takes gigabytes of Python objects; a LoRA's
# header is ~150 bytes a tensor (80 layers x 7 modules x 2 factors: < 200 KB).
_MAX_HEADER_BYTES = 16 << 20
# True while load_adapter(values_verified=True) parses bytes whose values were checked before (a
# registry download: the registry ran validate_artifact at upload, the digest proves these are those
# bytes): the one pass over every value (finite + peak, ~25% of an 84 MB parse) is skipped and the
# file reports finite_peak (True, 0.0), so no later check repeats it either.
VALUES_VERIFIED: contextvars.ContextVar[bool] = contextvars.ContextVar("loraserve_values_verified", default=False)
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def check_safetensors_layout(data: bytes | bytearray, name: str) -> dict[str, tuple[str, list[int], int, int]]:
    """Validate a safetensors buffer's framing: 8-byte LE header size, JSON header, offsets in range,
    and (as the library requires) tensors back to back from the data section's start to its end.

    Gives a precise message for truncated or corrupt files before anything decodes them; returns
    {key: (dtype, shape, begin, end)} with offsets relative to the data section (8 + header length).
    """
    if len(data) < 8:
        raise AdapterFormatError(f"{name}: truncated safetensors file ({len(data)} bytes, "
                                 f"shorter than the 8-byte header length)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise AdapterFormatError(
            f"{name}: truncated or corrupt safetensors file (header claims {header_len} bytes, "
            f"file has {len(data) - 8} after the length field)")
    if header_len > _MAX_HEADER_BYTES:
        raise AdapterFormatError(f"{name}: corrupt safetensors file (header claims {header_len} bytes, "
                                 f"over the limit of {_MAX_HEADER_BYTES} for a LoRA adapter)")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{name}: corrupt safetensors header (not JSON: {e})") from None
    except RecursionError:
        raise AdapterFormatError(f"{name}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{name}: corrupt safetensors header (not a JSON object)")
    body = len(data) - 8 - header_len
    entries: dict[str, tuple[str, list[int], int, int]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        entry = _header_entry(info)
        if entry is None:
            raise AdapterFormatError(
                f"{name}: corrupt safetensors header entry for {shorten(key)}: expected "
                f"{{\"dtype\": one of {sorted(_ST_ITEMSIZE)}, \"shape\": [ints >= 0], "
                f"\"data_offsets\": [begin, end] ints}}, got {shorten(info)}")
        dtype, shape, begin, end = entry
        numel = math.prod(shape)
        itemsize = _ST_ITEMSIZE[dtype]
        if not (0 <= begin <= end):
            raise AdapterFormatError(f"{name}: corrupt safetensors offsets for {shorten(key)}")
        if end > body:
            raise AdapterFormatError(
                f"{name}: truncated safetensors file: tensor {shorten(key)} ends at byte {end} of the "
                f"data section but only {body} bytes are present")
        if end - begin != numel * itemsize:
            raise AdapterFormatError(
                f"{name}: corrupt safetensors file: tensor {shorten(key)} {dtype}{list(shape)} needs "
                f"{numel * itemsize} bytes, offsets give {end - begin}")
        entries[key] = entry
    # no holes, no overlaps (two keys on the same bytes), nothing after the last tensor: the views
    # below may then be written in place and one pass over the data section sees every tensor once
    pos = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            raise AdapterFormatError(f"{name}: corrupt safetensors offsets: tensor {shorten(key)} starts at byte "
                                     f"{begin} of the data section, the previous one ends at {pos}")
        pos = end
    if pos != body:
        raise AdapterFormatError(f"{name}: corrupt safetensors file: {body - pos} bytes after the last tensor")
    return entries


def _header_entry(info: object) -> tuple[str, list[int], int, int] | None:
    """(dtype, shape, begin, end) of one header entry if every field has the right type, else None."""
    if not isinstance(info, dict):
        return None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)
    if not (isinstance(dtype, str) and dtype in _ST_ITEMSIZE and isinstance(shape, list)
            and all(is_int(d) and d >= 0 for d in shape) and isinstance(offsets, list) and len(offsets) == 2
            and all(is_int(o) for o in offsets)):
        return None
    return dtype, shape, offsets[0], offsets[1]


class TensorDict(dict):
    """{key: tensor} of one file, plus what one pass over all its bytes found: `finite_peak` =
    (every value finite, max |value|) when all tensors share one float dtype, else None."""

    finite_peak: tuple[bool, float] | None = None
    in_place_ok = True  # no two tensors share bytes (checked layout, or the library's own copies)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def load_safetensors_bytes(data: bytes | bytearray, name: str) -> TensorDict:
    """Decode a safetensors buffer. A writable buffer (bytearray: what the bundles read) is decoded
    without a copy: every tensor is a view of `data`, which the views keep alive; anything else
    (read-only bytes, an odd dtype, a misaligned offset) goes through the library, which copies."""
    entries = check_safetensors_layout(data, name)
    start = 8 + int.from_bytes(bytes(data[:8]), "little")
    out = _views(data, entries, start)
    staged = STAGED_IN_PROGRESS.get()
    if staged is not None and (out is None or {e[0] for e in entries.values()} - {"BF16", "F16", "F32"}
                               or len({e[0] for e in entries.values()}) > 1):
        staged.wait_all()  # the library's copy, or conversions of odd/mixed dtypes, read every value now
    if out is None:
        try:
            out = TensorDict(safetensors_load(bytes(data)))
        except Exception as e:  # the library's error type varies across versions
            detail = (str(e).splitlines() or [""])[0][:120]
            raise AdapterFormatError(f"{name}: corrupt safetensors file ({detail})") from None
    dtypes = {t.dtype for t in out.values()}
    if len(dtypes) == 1 and next(iter(dtypes)) in _BITS:  # one integer pass over the whole data section
        if VALUES_VERIFIED.get():
            out.finite_peak = (True, 0.0)
        elif out.finite_peak is None:  # copied tensors: each on its own (still no Python per element)
            stats = [finite_and_peak(t) for t in out.values()]
            out.finite_peak = (all(f for f, _ in stats), max((p for _, p in stats), default=0.0))
    else:
        out.finite_peak = None
    return out


def _owning_tensor(data) -> torch.Tensor | None:
    """The part of the uint8 tensor that a memoryview from bundle.writable_buffer shows, so that the
    views share that tensor's storage: for a pinned block, torch's caching host allocator then
    records the host->GPU copies made from it and never hands the block out again while one is in
    flight (a torch.frombuffer storage is unknown to it). None for any other buffer."""
    owner = getattr(getattr(data, "obj", None), "base", None)
    if not (isinstance(data, memoryview) and isinstance(owner, torch.Tensor) and owner.dtype == torch.uint8
            and owner.dim() == 1 and len(data)):
        return None
    import numpy as np

    offset = np.frombuffer(data, dtype=np.uint8).ctypes.data - owner.data_ptr()
    if not 0 <= offset <= owner.numel() - len(data):
        return None
    return owner[offset:offset + len(data)]


def _views(data, entries: dict, start: int) -> TensorDict | None:
    if not isinstance(data, (bytearray, memoryview)) or len(data) <= start or not entries:
        return None
    if isinstance(data, memoryview) and (data.readonly or data.ndim != 1 or data.itemsize != 1):
        return None
    dtypes = {e[0] for e in entries.values()}
    if not dtypes <= set(_ST_DTYPES):
        return None
    base = _owning_tensor(data)
    if base is None:
        base = torch.frombuffer(data, dtype=torch.uint8)  # shares data's memory and keeps it alive
    if base.data_ptr() % 8:
        return None
    out = TensorDict()
    try:
        for key, (dtype, shape, begin, end) in entries.items():
            out[key] = base[start + begin:start + end].view(_ST_DTYPES[dtype]).view(shape)
    except RuntimeError:  # an offset not a multiple of the item size
        return None
    if len(dtypes) == 1 and _ST_DTYPES[next(iter(dtypes))] in _BITS and not VALUES_VERIFIED.get():
        out.finite_peak = finite_and_peak(base[start:].view(_ST_DTYPES[next(iter(dtypes))]))
    return out


def check_torch_zip(data: bytes, name: str) -> None:
    """A torch zip checkpoint must store its records uncompressed, as torch.save writes them.

    torch.load inflates deflated records without a limit: a 3 MB .bin or .ckpt of deflated zeros
    would become gigabytes in memory. Stored records cannot hold more than the file's own bytes.
    """
    if not data.startswith(b"PK"):
        return  # the legacy (pre-1.6) pickle format: storages are read 1:1 from the file
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as e:
        raise AdapterFormatError(f"{name}: corrupt torch checkpoint (not a readable zip: "
                                 f"{(str(e).splitlines() or [''])[0][:120]})") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > len(data):
            raise AdapterFormatError(
                f"{name}: torch checkpoint record {shorten(info.filename)} is compressed "
                f"({info.file_size} bytes from {info.compress_size}); torch.save never compresses, and "
                f"torch.load would inflate it without a limit")


def load_torch_bytes(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: pickled code (any non-tensor global) is refused."""
    if isinstance(data, memoryview):
        data = bytes(data)
    check_torch_zip(data, name)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except RecursionError:
        raise AdapterFormatError(f"{name}: corrupt torch checkpoint (pickle nested too deeply)") from None
    except Exception as e:
        lines = [ln.strip()[:200] for ln in str(e).splitlines() if ln.strip()]
        # torch's message starts with generic advice; the line naming the refused global is the useful one.
        first_line = next((ln for ln in lines if "global" in ln.lower()), lines[0] if lines else type(e).__name__)
        raise AdapterFormatError(
            f"{name}: cannot be loaded safely with torch.load(weights_only=True) "
            f"(pickled code or corrupt file): {first_line}") from None
    if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise AdapterFormatError(f"{name}: expected a dict of tensors, got {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise AdapterFormatError(f"{name}: non-string key {shorten(repr(key))}")
        if value is None or (key.endswith("._extra_state") and not isinstance(value, torch.Tensor)):
            continue  # Megatron/TE bookkeeping, carries no weights
        if not isinstance(value, torch.Tensor):
            raise AdapterFormatError(f"{name}: {shorten(key)} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def load_tensor_file(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """Dispatch on the file name: *.safetensors, else a torch checkpoint."""
    if name.endswith(".safetensors"):
        return load_safetensors_bytes(data, name)
    return load_torch_bytes(data, name)


# Per float dtype: the integer view, the mask that clears the sign bit, and the exponent-all-ones
# pattern. For IEEE floats the sign-cleared bit pattern orders like |x|, and it is >= the exponent
# mask exactly for Inf and NaN: one integer max answers "all finite?" and "largest |x|?" at once.
_BITS = {torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80), torch.float16: (torch.int16, 0x7FFF, 0x7C00),
         torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000)}


_CHUNK = 1 << 20  # elements per pass of finite_and_peak on large tensors (2-4 MB: stays in cache)


def finite_and_peak(t: torch.Tensor) -> tuple[bool, float]:
    """(every value finite, max |value|) of a float32/16/bf16 tensor in one integer pass (the CPU
    has no fast bf16 isfinite: on an 84 MB adapter this pass replaced ~40% of the load time).
    Other dtypes: torch.isfinite and abs().max()."""
    if t.numel() == 0:
        return True, 0.0
    bits = _BITS.get(t.dtype)
    if bits is None:
        finite = bool(torch.isfinite(t).all())
        return finite, float(t.abs().max()) if finite else math.inf
    itype, sign_off, exp_all = bits
    flat = t.reshape(-1).view(itype)
    if flat.numel() <= _CHUNK:
        top = int((flat & sign_off).amax())
    else:  # in chunks through one small buffer: no temporary as large as t (its page faults cost more)
        tmp = torch.empty(_CHUNK, dtype=itype)
        top = 0
        for i in range(0, flat.numel(), _CHUNK):
            part = flat[i:i + _CHUNK]
            out = tmp[:part.numel()]
            torch.bitwise_and(part, sign_off, out=out)
            top = max(top, int(out.amax()))
    if top >= exp_all:
        return False, math.inf
    return True, float(torch.tensor([top], dtype=itype).view(t.dtype)[0])


def check_lora_tensor(t: torch.Tensor, key: str, origin: str, known_finite: bool = False) -> torch.Tensor:
    """A LoRA factor must be a 2-D finite float tensor; fp64 is narrowed to fp32. Returns it on CPU.
    known_finite: a pass over the whole file already found every value finite (TensorDict)."""
    if t.dtype == torch.float64:
        t = t.to(torch.float32)
    if t.dtype not in FLOAT_DTYPES:
        raise AdapterFormatError(
            f"{origin}: tensor {shorten(key)} has dtype {str(t.dtype).removeprefix('torch.')}; LoRA weights "
            f"must be float32, float16 or bfloat16")
    if t.dim() != 2:
        raise AdapterFormatError(f"{origin}: tensor {shorten(key)} has shape {list(t.shape)}, expected 2-D")
    if not known_finite and not finite_and_peak(t)[0]:
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise AdapterFormatError(f"{origin}: tensor {shorten(key)} contains {bad} values")
    return t.cpu()


def pair_factors(parts: dict[str, torch.Tensor], a_key: str, b_key: str, a_label: str, b_label: str,
                 where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's down (A [r, in]) and up (B [out, r]) factors from `parts`, checked: both present,
    the same rank, one dtype (fp32 when they differ). `where` prefixes every error message."""
    for have, need, have_label, need_label in ((a_key, b_key, a_label, b_label), (b_key, a_key, b_label, a_label)):
        if have in parts and need not in parts:
            raise AdapterFormatError(f"{where} has {have_label} but no {need_label}")
    a, b = parts[a_key], parts[b_key]
    if a.shape[0] != b.shape[1]:
        raise AdapterFormatError(
            f"{where}: {a_label} {list(a.shape)} and {b_label} {list(b.shape)} disagree on the rank")
    if a.dtype != b.dtype:
        a, b = a.to(torch.float32), b.to(torch.float32)
    return a, b
