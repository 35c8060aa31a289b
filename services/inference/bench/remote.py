"""Bench against servers other than the gRPC one, and datasets made usable against a stock server.

* OpenAITarget: the OpenAI-compatible HTTP front (`loraserve serve --openai-port`), through
  `POST /v1/completions` with `stream: true` (standard library HTTP in worker threads: no client
  package needed on a GPU image). The adapter is chosen by `model` (registry name[:ref]); rows
  with a lora_request send it as the `lora_request` body field.
* push_dataset_adapters: a server started as the README says has no `--allowed-lora-dir`, so
  `lora_request.lora_path` rows are refused (PERMISSION_DENIED). This pushes each distinct
  lora_path to the registry (idempotently: the same bytes are the same version) and rewrites
  the rows to name the registry adapter instead.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import replace

from .dataset import BenchRequest
from .runner import RequestRecord

LORA_PATH_HINT = ("rows with lora_request.lora_path need a server started with --allowed-lora-dir DIR (the "
                  "adapters' parent directory); with a server started as the README says, pass --registry "
                  "HOST:PORT so that the bench pushes the dataset's adapters there and sends registry references")


def push_dataset_adapters(requests: list[BenchRequest], registry: str, token: str | None = None,
                          progress: bool = False) -> tuple[list[BenchRequest], dict[str, str]]:
    """Push every distinct lora_path of the rows; return the rows rewritten to registry references and
    the mapping {lora_path: "name:version"}."""
    from loraserve.registry.client import RegistryClient

    paths: dict[str, str] = {}
    for r in requests:
        if r.lora_request is not None and r.lora_request.get("lora_path"):
            paths.setdefault(r.lora_request["lora_path"], r.lora_request.get("lora_name") or "lora")
    refs: dict[str, str] = {}
    with RegistryClient(registry, token=token) as client:
        for path, lora_name in paths.items():
            name = "bench-" + re.sub(r"[^A-Za-z0-9._-]", "-", lora_name)
            resp = client.push(path, name, exist_ok=True, progress=progress)
            refs[path] = f"{resp.adapter.name}:{resp.adapter.version}"
    rewritten = [replace(r, lora_request=None, adapter=refs[r.lora_request["lora_path"]])
                 if r.lora_request is not None and r.lora_request.get("lora_path") in refs else r for r in requests]
    return rewritten, refs


class OpenAITarget:
    """A running OpenAI-compatible front: /v1/completions, streamed as server-sent events."""

    def __init__(self, base_url: str, api_key: str | None = None, base_model: str = "default",
                 timeout_s: float = 600.0, streaming: bool = True):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.api_key, self.base_model, self.timeout_s, self.streaming = api_key, base_model, timeout_s, streaming
        self.name = f"openai:{self.base_url}"
        self._pool = None  # blocking HTTP in threads: one per request in flight (the default pool caps at ~cpus+4)

    def _post(self, path: str, body: dict):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), headers=headers)
        return urllib.request.urlopen(req, timeout=self.timeout_s)  # noqa: S310 - a URL the user gave

    async def start(self) -> None:
        def models():
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            with urllib.request.urlopen(urllib.request.Request(self.base_url + "/models", headers=headers),
                                        timeout=30) as resp:  # noqa: S310
                return json.load(resp)

        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="bench-http")
        listed = await asyncio.to_thread(models)
        self.name = f"openai:{self.base_url} ({listed['data'][0]['id'] if listed.get('data') else '?'})"

    def _body(self, req: BenchRequest, ignore_eos: bool) -> dict:
        body = {"model": req.adapter or self.base_model, "max_tokens": req.output_tokens, "temperature": 0.0,
                "ignore_eos": ignore_eos, "stream": self.streaming,
                "prompt": req.input_ids if req.input_ids is not None else req.prompt}
        if self.streaming:
            body["stream_options"] = {"include_usage": True}
        if req.lora_request is not None:
            body["lora_request"] = dict(req.lora_request)
        return body

    def _run_blocking(self, req: BenchRequest, ignore_eos: bool) -> RequestRecord:
        rec = RequestRecord(req.task_id, req.adapter_key, time.perf_counter(), None, 0.0)
        usage = None
        try:
            with self._post("/completions", self._body(req, ignore_eos)) as resp:
                if not self.streaming:
                    usage = json.load(resp).get("usage")
                else:
                    for raw in resp:  # "data: {...}\n", blank lines between events, "data: [DONE]"
                        line = raw.decode("utf-8").strip()
                        if not line.startswith("data:") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[5:])
                        if event.get("usage"):
                            usage = event["usage"]
                        if any(c.get("text") for c in event.get("choices", [])):
                            rec.token_arrived(time.perf_counter())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise RuntimeError(f"HTTP {exc.code}: {detail}") from None
        rec.end = time.perf_counter()
        if usage is None:
            raise RuntimeError("the response carried no usage (token counts)")
        rec.prompt_tokens, rec.output_tokens = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        return rec

    async def run_one(self, req: BenchRequest, ignore_eos: bool) -> RequestRecord:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run_blocking, req, ignore_eos)

    async def cache_stats(self) -> dict:
        return {}  # the HTTP front has no adapter-cache endpoint; use the gRPC target for cache hit rates

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
