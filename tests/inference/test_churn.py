"""Many more distinct adapters than the tiers hold: requests queue (never fail) and finish with
exactly transformers + peft's output; the two scheduler/KV defects of issue 12 stay fixed."""
from __future__ import annotations

import copy
import os
import time

import pytest
import torch

from loraserve import LLM, LoraConfig, LoRARequest, SamplingParams
from loraserve.adapters.testing import make_peft_adapter

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = [("q_proj", "v_proj"), ALL, ("k_proj", "o_proj", "down_proj"), ("gate_proj", "up_proj")]


def make_adapters(root, n: int) -> list[str]:
    """n distinct adapters: ranks 2..16, several module sets, a large alpha so outputs differ."""
    paths = []
    for i in range(n):
        r = (2, 4, 8, 16)[i % 4]
        paths.append(str(make_peft_adapter(os.path.join(root, f"a{i}"), modules=SHAPES[i % len(SHAPES)], r=r,
                                           alpha=4.0 * r, seed=1000 + i)))
    return paths


def peft_greedy(base, adapter_dir, prompt, n):
    from peft import PeftModel

    model = base if adapter_dir is None else PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    with torch.no_grad():
        seq = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return seq[0, len(prompt):].tolist()


class PeftReference:
    """One peft model holding every adapter (peft's load_adapter / set_adapter), greedy decoding."""

    def __init__(self, base, paths: list[str]):
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="p0").eval()
        for i, p in enumerate(paths[1:], 1):
            self.model.load_adapter(p, adapter_name=f"p{i}")
        self.index = {p: f"p{i}" for i, p in enumerate(paths)}

    def greedy(self, path: str | None, prompt: list[int], n: int) -> list[int]:
        if path is None:
            with self.model.disable_adapter():
                return self._generate(prompt, n)
        self.model.set_adapter(self.index[path])
        return self._generate(prompt, n)

    def _generate(self, prompt, n):
        with torch.no_grad():
            seq = self.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
        return seq[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def twenty(tmp_path_factory):
    return make_adapters(str(tmp_path_factory.mktemp("churn")), 20)


def test_twenty_adapters_through_two_slots_and_three_host_entries_match_peft(tiny_llama, twenty):
    """20 distinct adapters at once with max_loras=2, max_cpu_loras=3: nothing fails for lack of
    room, every output equals peft's, and afterwards nothing is pinned or held."""
    path, base = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu",
              lora_config=LoraConfig(max_lora_rank=16, max_loras=2, max_cpu_loras=3))
    prompts = [[5 + i, 6, 7 + i % 3, 8, 9] for i in range(len(twenty))] + [[10, 11, 12]]
    loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(twenty)] + [None]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, lora_request=loras)
    ref_model = PeftReference(base, twenty)
    same_as_base = 0
    for prompt, lora, out in zip(prompts, loras, outs):
        ref = ref_model.greedy(lora and lora.lora_path, prompt, 6)
        assert out.outputs[0].token_ids == ref, lora and lora.lora_name
        if lora is not None and lora.lora_int_id <= 5:
            same_as_base += ref == peft_greedy(base, None, prompt, 6)
    assert same_as_base < 3  # the adapters do change the output (the check could fail)
    stats = llm.engine.lora_manager.stats_dict()
    assert stats["device_slots_pinned"] == 0 and stats["adapter_holds"] == 0
    assert stats["host_adapters"] <= 3
    assert stats["device"]["misses"] >= 20  # each adapter went through a slot


def test_adapter_that_fails_to_reload_fails_alone(tiny_llama, tmp_path):
    """Regression (issue 12): an adapter error inside Scheduler.schedule() used to lose the
    sequences skipped before it (their streams hung) and raise again every step. Now the
    failing request ends with finish_reason 'abort' and everything queued around it completes."""
    path, base = tiny_llama
    a, c, b = make_adapters(str(tmp_path), 3)
    llm = LLM(model=path, dtype="float32", device="cpu",
              lora_config=LoraConfig(max_lora_rank=16, max_loras=1, max_cpu_loras=1))
    eng = llm.engine
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    eng.add_request("a", [5, 6, 7], p, LoRARequest("a", 1, a))
    eng.add_request("c", [5, 6, 8], p, LoRARequest("c", 2, c))   # waits (slot and host busy): skipped
    eng.add_request("b", [5, 6, 9], p, LoRARequest("b", 3, b))   # parsed, then dropped (no host room)
    os.rename(b, b + ".gone")                                      # its reload will fail
    finals = {}
    for _ in range(500):
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
        if not eng.has_unfinished_requests():
            break
    assert set(finals) == {"a", "b", "c"}
    assert finals["b"].outputs[0].finish_reason == "abort"
    assert finals["a"].outputs[0].token_ids == peft_greedy(base, a, [5, 6, 7], 5)
    assert finals["c"].outputs[0].token_ids == peft_greedy(base, c, [5, 6, 8], 5)
    stats = eng.lora_manager.stats_dict()
    assert stats["device_slots_pinned"] == 0 and stats["adapter_holds"] == 0
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_kv_budget_does_not_count_lora_slots_twice(tiny_llama, monkeypatch):
    """Regression (issue 12): the KV budget subtracted the LoRA slots' bytes from free GPU memory
    that already excluded them (the slots are allocated before the KV cache is sized). With the
    same free memory, the KV cache must be the same size with or without LoRA slots."""
    from loraserve.inference.model_runner import ModelRunner

    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=64, max_loras=64))
    runner = llm.engine.runner
    assert llm.engine.lora_manager.reserved_device_bytes() > 0
    free = 8 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 16 << 30))
    probe = object.__new__(ModelRunner)  # the sizing rule alone, as on a GPU with `free` bytes free
    probe.config, probe.args, probe.dtype = runner.config, runner.args, runner.dtype
    probe.device, probe.block_size = torch.device("cuda"), runner.block_size
    probe.kv_dtype = runner.kv_dtype
    probe.config = copy.copy(runner.config)
    probe.config.max_num_seqs = 1 << 20  # no cap from max_seq_len * max_num_seqs
    probe.lora_manager = None
    without = probe._size_kv_cache()
    probe.lora_manager = llm.engine.lora_manager
    assert probe._size_kv_cache() == without


def test_device_tier_sized_by_memory_and_max_loras_caps_each_batch(tiny_llama, twenty):
    """PeftCacheConfig.num_device_module_layer sizes the GPU tier (TensorRT-LLM semantics: max-rank
    (layer, module) weights); max_loras caps the distinct adapters of one batch, not the tier."""
    from loraserve import PeftCacheConfig

    path, base = tiny_llama
    modules_per_adapter = 2 * 7  # tiny model: 2 layers x 7 modules
    llm = LLM(model=path, dtype="float32", device="cpu", max_num_seqs=8,
              lora_config=LoraConfig(max_lora_rank=16, max_loras=2),
              peft_cache_config=PeftCacheConfig(num_device_module_layer=5 * modules_per_adapter))
    eng = llm.engine
    assert eng.lora_manager.num_slots == 5
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for i in range(5):
        eng.add_request(f"r{i}", [5 + i, 6, 7], p, LoRARequest(f"a{i}", i + 1, twenty[i]))
    finals, max_distinct = {}, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
        running = {s.lora.key for s in eng.scheduler.running if s.lora is not None}
        max_distinct = max(max_distinct, len(running))
    assert max_distinct == 2
    for i in range(5):
        assert finals[f"r{i}"].outputs[0].token_ids == peft_greedy(base, twenty[i], [5 + i, 6, 7], 4)
    assert eng.lora_manager.stats_dict()["device_slots_used"] == 5  # all five stay resident


def test_generate_async_many_adapters_and_early_close(tiny_llama, twenty):
    """LLM.generate_async resolves adapters off the engine thread; concurrent streams over more
    adapters than the tiers hold match LLM.generate, and a stream closed early leaves no hold."""
    import asyncio

    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu",
              lora_config=LoraConfig(max_lora_rank=16, max_loras=2, max_cpu_loras=3))
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    loras = [LoRARequest(f"a{i}", i + 1, twenty[i]) for i in range(6)]
    prompts = [[4 + i, 9, 2] for i in range(6)]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, p, lora_request=loras)]

    async def final(prompt, lora):
        last = None
        async for out in llm.generate_async(prompt, p, lora, streaming=False):
            last = out
        return last.outputs[0].token_ids

    async def closed_early():
        stream = llm.generate_async([7, 7, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
                                    LoRARequest("a9", 10, twenty[9]))
        await stream.__anext__()
        await stream.aclose()

    async def main():
        got = await asyncio.gather(*(final(pr, lr) for pr, lr in zip(prompts, loras)), closed_early())
        return got[:-1]

    assert asyncio.run(main()) == expected
    llm.shutdown()
    stats = llm.engine.lora_manager.stats_dict()
    assert stats["adapter_holds"] == 0 and stats["device_slots_pinned"] == 0


def test_idle_adapter_is_evicted_before_one_with_queued_work(tiny_llama, twenty):
    """Two GPU slots, both idle: P (least recently used, but with requests queued) and X (nobody
    waits for it). A one-off request for Q takes X's slot, not P's."""
    from loraserve.inference.sequence import Sequence

    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=16, max_loras=2))
    mgr = llm.engine.lora_manager
    p = SamplingParams(max_tokens=2)

    def seq(i):
        return Sequence(f"s{i}-{time.monotonic_ns()}", [5, 6], p, lora=mgr.resolve(LoRARequest(f"a{i}", i + 1, twenty[i])))

    p_run, x_run = seq(0), seq(1)
    assert mgr.try_acquire(p_run) and mgr.try_acquire(x_run)   # P placed first: P is the LRU slot
    for s in (p_run, x_run):
        mgr.release_slot(s)
        mgr.release_request(s)
    p_queued = seq(0)                                           # P has queued work again
    q = seq(2)
    assert mgr.try_acquire(q)
    on_device = {h.name for h in mgr.resident()["device"]}
    assert on_device == {"a0", "a2"}, on_device
    for s in (q, p_queued):
        mgr.release_request(s)


@pytest.mark.parametrize("handoff", [True, False])
def test_oldest_waiter_gets_a_drained_slot_within_one_requests_lifetime(tiny_llama, twenty, handoff):
    """Two slots busy with steady streams of A and B requests (max_tokens 12), then C arrives.
    Slot hand-off: C waits for ONE slot's running requests (<= 12 steps + the copy), and the other
    slot keeps admitting meanwhile. The bounded-bypass policy (LORASERVE_SLOT_HANDOFF=0) admits 16
    newer requests first, then stops all admissions until a slot drains."""
    path, base = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", max_num_seqs=64,
              lora_config=LoraConfig(max_lora_rank=16, max_loras=2))
    eng, mgr = llm.engine, llm.engine.lora_manager
    mgr.slot_handoff = handoff
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    a, b, c = (LoRARequest(f"a{i}", i + 1, twenty[i]) for i in range(3))
    c_first, admitted_while_waiting, k = None, set(), 0
    for step in range(120):
        for lr in (a, b):
            eng.add_request(f"{lr.lora_name}-{k}", [5, 6, 7 + k % 5], p, lr)
            k += 1
        if step == 20:
            eng.add_request("C", [5, 6, 9], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), c)
        outs = eng.step()
        if step >= 20 and c_first is None:
            admitted_while_waiting |= {s.request_id for s in eng.scheduler.running if s.num_computed_tokens <= 4}
        if any(o.request_id == "C" and o.outputs[0].token_ids for o in outs):
            c_first = step
            break
    assert c_first is not None
    if handoff:
        assert c_first - 20 <= 12 + 2, c_first
        assert mgr.num_handoffs >= 1
        assert admitted_while_waiting  # the slot that was not handed over kept taking new requests
    else:
        assert c_first - 20 <= 4 * mgr.max_slot_bypass
    while eng.has_unfinished_requests():
        eng.step()
    assert mgr.stats_dict()["device_slots_pinned"] == 0 and mgr.stats_dict()["adapter_holds"] == 0
