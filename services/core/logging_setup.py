"""Process logging for the `loraserve` commands: text (the default) or JSON, one object a line.

    setup_logging("INFO", "json")

JSON lines carry ts (ISO 8601, UTC), level, logger, message, and, for the inference service's
per-request line, the request's fields under "request" (request_id, adapter, prompt_tokens,
output_tokens, finish_reason, code, e2e_s, ttft_s, ...), so a log pipeline (Loki, Elastic,
CloudWatch) can filter and aggregate without parsing the text. An exception's traceback is
one string field, "exc_info"; the line stays one line.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_EXTRA_FIELDS = ("request",)   # LogRecord attributes copied into the JSON object when present


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text", stream=None, force: bool = False) -> None:
    """Configure the root logger, as logging.basicConfig does: a no-op when the root logger already
    has handlers (an embedding application's, pytest's), unless force."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=force)
