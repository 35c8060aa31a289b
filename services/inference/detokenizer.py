"""Tokenizer loading and incremental detokenization.

Text is produced as tokens arrive, correct across multi-byte characters split over
tokens: a delta is emitted only once the decoded tail no longer ends in U+FFFD, and
decoding restarts a few tokens back (prefix offset) so that tokenizers whose decoders
depend on neighbours (SentencePiece's leading space) give the same text as a full decode.
"""
from __future__ import annotations

import json
import os

from tokenizers import Tokenizer


class TokenizerWrapper:
    def __init__(self, model_dir: str):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json")
        self.tok = Tokenizer.from_file(path)
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        self.config: dict = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                self.config = json.load(f)
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        self.add_bos = bool(self.config.get("add_bos_token", False))

    def _special_id(self, key: str) -> int | None:
        tok = self.config.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return self.tok.token_to_id(tok) if tok else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        template = self.config.get("chat_template")
        if template:
            import jinja2

            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
            return env.from_string(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.config.get("bos_token") or "", eos_token=self.config.get("eos_token") or "")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TokenizerWrapper, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(len(self.ids) - 6, 0)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes (may be '')."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""
