"""Chat templates and prompt encoding with the semantics of transformers' tokenizers.

What `transformers.AutoTokenizer` does, and the engine must do the same so that token ids match:

- the template comes from `chat_template.jinja` (where transformers 5 saves it) or from
  `tokenizer_config.json["chat_template"]` (a string, or a list of {name, template}: "default" wins);
- it renders in a sandboxed jinja environment with trim_blocks/lstrip_blocks, `raise_exception`,
  a `tojson` that does not HTML-escape, `strftime_now`, loop controls; the template sees
  `messages`, `add_generation_prompt`, every special token (`bos_token`, `eos_token`, ...) and
  any extra keyword; message keys whose value is None are dropped first;
- the rendered chat is encoded with add_special_tokens=False (the template writes its own BOS:
  no double BOS), while a plain text prompt is encoded with add_special_tokens=True, through the
  tokenizer.json post-processor (transformers 5 ignores tokenizer_config.json's add_bos_token when
  a tokenizer.json exists: the post-processor is the one source of truth).

Where transformers is installed its own compiler (`_compile_jinja_template`) renders, so the
filters and globals are exactly its; without it an equivalent environment is built here.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from .errors import ChatTemplateError  # noqa: F401 - declared with its status there

CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def load_chat_template(model_dir: str, config: dict) -> str | None:
    """chat_template.jinja first (transformers 5 writes it there), then tokenizer_config.json."""
    path = os.path.join(model_dir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


def _compile_fallback(template: str):
    """The environment transformers builds, for machines without transformers."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes (<, >, &, '): templates that embed JSON tool schemas differ
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def compile_template(template: str, use_transformers: bool = True):
    if use_transformers:
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            return _compile_jinja_template(template)
        except ImportError:  # no transformers, or it refuses this jinja2 version (< 3.1.6)
            pass
    return _compile_fallback(template)


class ChatTemplate:
    """One model's chat template, rendered as transformers' apply_chat_template(tokenize=False) does."""

    def __init__(self, template: str, special_tokens: dict[str, str], use_transformers: bool = True):
        self.source = template
        self.special_tokens = special_tokens
        self.use_transformers = use_transformers
        self._template = None  # compiled on first use: jinja2 (and transformers) load only for chats

    @property
    def _compiled(self):
        if self._template is None:
            self._template = compile_template(self.source, self.use_transformers)
        return self._template

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not messages:
            raise ChatTemplateError("messages is empty: a chat needs at least one message")
        for m in messages:
            if not isinstance(m, dict):
                raise ChatTemplateError(f"each message must be a mapping with role and content, got {m!r}")
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}  # kwargs overwrite special tokens, as in transformers
        import jinja2

        try:
            compiled = self._compiled
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from exc
        try:
            return compiled.render(messages=chat, tools=variables.pop("tools", None),
                                         documents=variables.pop("documents", None),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as exc:  # raise_exception(...) and template bugs alike
            raise ChatTemplateError(f"chat template: {exc}") from exc
