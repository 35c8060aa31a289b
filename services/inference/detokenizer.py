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

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

from .chat_template import SPECIAL_TOKEN_KEYS, ChatTemplate, ChatTemplateError, load_chat_template, token_content


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
        # plain text gets what AutoTokenizer(text) adds (the tokenizer.json post-processor; transformers 5
        # ignores add_bos_token next to a tokenizer.json); a rendered chat gets nothing (its template writes it)
        self.add_bos = self.bos_token_id is not None and self.tok.encode("", add_special_tokens=True).ids[:1] == [
            self.bos_token_id]
        specials = {k: token_content(self.config.get(k)) for k in SPECIAL_TOKEN_KEYS}
        template = load_chat_template(model_dir, self.config)
        self.chat_template = None if template is None else ChatTemplate(
            template, {k: v for k, v in specials.items() if v is not None})

    def _special_id(self, key: str) -> int | None:
        tok = self.config.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return self.tok.token_to_id(tok) if tok else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """A text prompt, as `AutoTokenizer(text).input_ids` (BOS where the tokenizer adds one)."""
        return self.tok.encode(text, add_special_tokens=True).ids

    def id_to_tokens(self, ids: list[int]) -> list[str]:
        """Each id's token string ("" for an id the vocabulary lacks)."""
        return [self.tok.id_to_token(i) or "" for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat as text, as transformers' apply_chat_template(tokenize=False) renders it; a template's
        raise_exception is ChatTemplateError (a ValueError). Without a template: a plain role: content form."""
        if self.chat_template is not None:
            return self.chat_template.render(messages, add_generation_prompt, **kwargs)
        if not messages:
            raise ChatTemplateError("messages is empty: a chat needs at least one message")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Prompt ids of a chat, as apply_chat_template(tokenize=True): no special tokens added on top of
        what the template writes (a template that emits {{ bos_token }} gets one BOS, not two)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        if self.chat_template is None:
            return self.encode(text)  # the plain fallback is an ordinary text prompt
        return self.tok.encode(text, add_special_tokens=False).ids


class IncrementalDetokenizer:
    """One Rust call per token through tokenizers' DecodeStream (tokenizers >= 0.21; primed with the
    prompt's last tokens for the neighbour-dependent decoders), else two decodes of a short window."""

    def __init__(self, tokenizer: TokenizerWrapper, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-6:])      # the window the fallback path decodes from
        self.read_offset = len(self.ids)
        self.prefix_offset = 0
        self.stream = None
        if DecodeStream is not None:
            try:
                stream = DecodeStream(skip_special_tokens=True)
                for t in self.ids:
                    stream.step(tokenizer.tok, t)
                self.stream = stream
            except Exception:  # noqa: BLE001 - e.g. an id the tokenizer lacks: the fallback copes
                self.stream = None

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes (may be '')."""
        if self.stream is not None:
            try:
                text = self.stream.step(self.tokenizer.tok, token_id) or ""
                self.ids.append(token_id)
                return text
            except Exception:  # noqa: BLE001 - the stream refused this id; go on with the window path
                self.stream = None
                self.read_offset = len(self.ids)
                self.prefix_offset = max(self.read_offset - 6, 0)
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""
