"""Hostile adapter directories for the regression tests of issue 9 (each is a valid tiny PEFT
adapter with exactly one thing made hostile), shared by the loader, registry and lora_path tests.

    hostile_adapter(dest, kind) -> a directory; KINDS lists every kind
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from loraserve.adapters.testing import make_peft_adapter

KINDS = ("string_offsets", "deep_json_config", "deep_json_header", "alpha_1e38", "huge_key", "list_target_modules")
DEPTH = 100_000


def _safetensors(header: dict | str, body: bytes = b"") -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def hostile_adapter(dest: Path, kind: str) -> Path:
    dest = make_peft_adapter(dest, seed=3)
    st, cfg = dest / "adapter_model.safetensors", dest / "adapter_config.json"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if kind == "string_offsets":  # the TypeError of issue 9 item 6
        st.write_bytes(_safetensors({key: {"dtype": "F32", "shape": [4, 64], "data_offsets": ["0", "1024"]}},
                                    bytes(1024)))
    elif kind == "deep_json_config":  # the RecursionError of issue 9 item 6
        cfg.write_text("[" * DEPTH + "]" * DEPTH)
    elif kind == "deep_json_header":
        st.write_bytes(_safetensors("{\"a\":" + "[" * DEPTH + "]" * DEPTH + "}"))
    elif kind == "alpha_1e38":  # scale 2.5e37: finite in fp32 after folding, NaN logits when served
        raw = json.loads(cfg.read_text())
        cfg.write_text(json.dumps({**raw, "lora_alpha": 1e38}))
    elif kind == "huge_key":  # a 10,000-character tensor name must not come back whole in a message
        st.write_bytes(_safetensors({"k" * 10_000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                                    bytes(4)))
    elif kind == "list_target_modules":
        raw = json.loads(cfg.read_text())
        cfg.write_text(json.dumps({**raw, "target_modules": [["q_proj"], 7]}))
    else:
        raise ValueError(kind)
    return dest
