"""The offline Python API, shaped like TensorRT-LLM's and vLLM's `LLM`.

    llm = LLM(model=path, dtype="auto", lora_config=..., peft_cache_config=...)
    outputs = llm.generate(prompts, sampling_params, lora_request=[...])
    async for out in llm.generate_async(prompt, sampling_params, streaming=True): ...
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Sequence

from loraserve.config import LoRARequest, SamplingParams, engine_config_from_kwargs

from .async_llm import AsyncLLM
from .engine import LLMEngine
from .lora.manager import release_after_engine, resolve_async
from .outputs import RequestOutput


def default_model_path() -> str:
    """The embedded default model (built by scripts/make_default_model.py)."""
    env = os.environ.get("LORASERVE_DEFAULT_MODEL")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "models", "default"))


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", **kwargs):
        self.config = engine_config_from_kwargs(model or default_model_path(), dtype=dtype, **kwargs)
        self.engine = LLMEngine(self.config)
        self._async: AsyncLLM | None = None
        self._next_id = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _id(self) -> str:
        self._next_id += 1
        return f"offline-{self._next_id}"

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput] | RequestOutput:
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        n = len(batch)
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params or SamplingParams()] * n
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * n
        if len(params) != n or len(loras) != n:
            raise ValueError(f"got {n} prompts, {len(params)} sampling_params and {len(loras)} lora_requests")
        if self._async is not None and self._async.num_active == 0:
            self.shutdown()  # the engine goes back to this thread; the next generate_async restarts its thread
        pending: list[tuple] = []  # (request_id, prompt, params, lora) for the engine thread
        groups: list[list[str]] = []  # engine requests of each prompt (n > 1: one per completion)
        try:
            for prompt, p, lr in zip(batch, params, loras):
                group = []
                groups.append(group)
                for j in range(p.n):
                    sub = p if p.n == 1 else dataclasses.replace(
                        p, n=1, seed=None if p.seed is None else (p.seed + j + 2**63) % 2**64 - 2**63)  # int64 wrap
                    rid = self._id()
                    if self._async is None:
                        self.engine.add_request(rid, prompt, sub, lr)
                    else:
                        pending.append((rid, prompt, sub, lr))
                    group.append(rid)
        except Exception:
            for rid in (r for g in groups for r in g if self._async is None):  # a bad prompt fails the whole call
                self.engine.abort_request(rid)
            raise
        if self._async is not None:  # async streams are running: the engine thread serves this batch too
            final_by_id = self._run_on_engine_thread(pending)
            results = [final_by_id[g[0]] for g in groups]
            for out, group in zip(results, groups):
                if len(group) > 1:
                    out.outputs = [dataclasses.replace(final_by_id[r].outputs[0], index=j) for j, r in enumerate(group)]
            return results[0] if single else results
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=sum(len(g) for g in groups), desc="generate")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        results = []
        for group in groups:
            out = final[group[0]]
            if len(group) > 1:
                out.outputs = [dataclasses.replace(final[r].outputs[0], index=j) for j, r in enumerate(group)]
            results.append(out)
        return results[0] if single else results

    def _run_on_engine_thread(self, requests: list[tuple]) -> dict[str, RequestOutput]:
        """Final outputs of requests submitted to the running AsyncLLM, waited for on a private event
        loop in a helper thread (generate() may be called from inside the caller's own event loop)."""
        import asyncio
        import concurrent.futures

        async def one(rid, prompt, params, lora):
            last = None
            async for out in self._async.generate(prompt, params, lora, rid):
                last = out
            return last

        async def run_all():
            return await asyncio.gather(*(one(*r) for r in requests))

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            outs = pool.submit(asyncio.run, run_all()).result()
        return {out.request_id: out for out in outs}

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             add_generation_prompt: bool = True) -> RequestOutput | list[RequestOutput]:
        """vLLM's LLM.chat: one conversation ([{"role", "content"}, ...]) or a list of them, rendered
        with the model's chat template (tokenizer_config.json; a plain fallback without one)."""
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        # token ids as transformers' apply_chat_template(tokenize=True) gives them (no BOS on top of the template's)
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt) for c in conversations]
        outs = self.generate(prompts, sampling_params, lora_request)
        return outs[0] if single else outs

    async def generate_async(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                             lora_request: LoRARequest | None = None, streaming: bool = True,
                             request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._async is None:
            self._async = AsyncLLM(self.engine)
        async_llm = self._async
        last, hold = None, None
        try:
            if lora_request is not None and self.engine.lora_manager is not None:
                # parse a new adapter on a worker thread, not on the engine thread (its steps go on)
                hold = await resolve_async(self.engine.lora_manager, lora_request)
            async for out in async_llm.generate(prompt, sampling_params, lora_request, request_id or self._id(),
                                                lora_handle=hold):
                last = out
                if streaming:
                    yield out
        finally:
            if hold is not None:
                release_after_engine(async_llm, hold)
        if not streaming and last is not None:
            yield last

    def shutdown(self) -> None:
        if self._async is not None:
            self._async.shutdown()
            self._async = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
