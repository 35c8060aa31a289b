"""Multi-LoRA batches against transformers + peft run one adapter at a time (the reference)."""
from __future__ import annotations

import copy

import pytest
import torch

from loraserve import LLM, LoraConfig, LoRARequest, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 45)), [3] * 9]

ADAPTERS = {
    "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
    "rslora-r16": dict(r=16, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "down_proj"]),
    "pattern": dict(r=2, lora_alpha=4, target_modules=["q_proj", "gate_proj", "up_proj"],
                    rank_pattern={"gate_proj": 6}, alpha_pattern={"up_proj": 12}),
    "layer1-mlp": dict(r=4, lora_alpha=4, target_modules=["down_proj", "up_proj"], layers_to_transform=[1]),
}


def peft_adapter_with_random_weights(base, out_dir, seed, **kw):
    """A trained-looking PEFT adapter saved with save_pretrained: random A and B, and for DoRA
    (use_dora=True) magnitudes off the initial norms by +-20%, so that g differs from 1."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out_dir)
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    _, base = tiny_llama
    out = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        d = str(tmp_path_factory.mktemp(name))
        out[name] = (d, peft_adapter_with_random_weights(base, d, seed=100 + i, **kw))
    return out


def peft_greedy(model, prompt, n):
    with torch.no_grad():
        seq = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return seq[0, len(prompt):].tolist()


def _requests(adapters):
    reqs = [None]
    for i, (name, (path, _)) in enumerate(adapters.items()):
        reqs.append(LoRARequest(name, i + 1, path))
    return reqs


@pytest.mark.parametrize("max_loras", [8, 2])
def test_mixed_batch_matches_peft_per_adapter(tiny_llama, adapters, max_loras):
    """Every prompt with every adapter (and with none) in one batch; with max_loras=2 there are
    more distinct adapters than GPU slots, so requests wait for slots and still finish right."""
    path, base = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu",
              lora_config=LoraConfig(max_lora_rank=16, max_loras=max_loras, max_cpu_loras=8))
    reqs = _requests(adapters)
    prompts, loras = [], []
    for prompt in PROMPTS:
        for r in reqs:
            prompts.append(prompt)
            loras.append(r)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, lora_request=loras)
    for prompt, lora, out in zip(prompts, loras, outs):
        ref_model = base if lora is None else adapters[lora.lora_name][1]
        assert out.outputs[0].token_ids == peft_greedy(ref_model, prompt, 8), (lora and lora.lora_name, prompt)
    stats = llm.engine.lora_manager.stats_dict()
    assert stats["device_slots_pinned"] == 0
    if max_loras == 2:
        assert stats["device"]["evictions"] > 0
    base_out = [o.outputs[0].token_ids for o, l in zip(outs, loras) if l is None]
    assert base_out == [peft_greedy(base, p, 8) for p in PROMPTS]


def test_adapters_change_outputs(tiny_llama, adapters):
    """Guard against a vacuous pass: the adapters really change greedy outputs."""
    path, base = tiny_llama
    changed = sum(peft_greedy(m, PROMPTS[2], 8) != peft_greedy(base, PROMPTS[2], 8) for _, m in adapters.values())
    assert changed >= 3


def test_identity_is_content_digest(tiny_llama, adapters, tmp_path):
    """Same name and id, new weights at the same path: the new weights are served."""
    import shutil

    path, base = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=16, max_loras=2))
    d = tmp_path / "a"
    shutil.copytree(adapters["qv-r4"][0], d)
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = llm.generate(PROMPTS[2], p, lora_request=LoRARequest("x", 1, str(d))).outputs[0].token_ids
    assert first == peft_greedy(adapters["qv-r4"][1], PROMPTS[2], 8)
    shutil.rmtree(d)
    shutil.copytree(adapters["all-r8"][0], d)
    second = llm.generate(PROMPTS[2], p, lora_request=LoRARequest("x", 1, str(d))).outputs[0].token_ids
    assert second == peft_greedy(adapters["all-r8"][1], PROMPTS[2], 8)


def test_bad_adapters_are_refused_and_others_unaffected(tiny_llama, adapters, tmp_path):
    from loraserve.adapters import AdapterFormatError

    path, base = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu",
              lora_config=LoraConfig(max_lora_rank=8, lora_target_modules=["attn_q", "attn_k", "attn_v", "attn_dense"]))
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with pytest.raises(AdapterFormatError, match="exceeds"):
        llm.generate(PROMPTS[0], p, lora_request=LoRARequest("big", 3, adapters["rslora-r16"][0]))
    with pytest.raises(AdapterFormatError, match="not enabled"):
        llm.generate(PROMPTS[0], p, lora_request=LoRARequest("mlp", 5, adapters["layer1-mlp"][0]))
    with pytest.raises(LookupError, match="does not exist"):
        llm.generate(PROMPTS[0], p, lora_request=LoRARequest("gone", 6, str(tmp_path / "nope")))
    ok = llm.generate(PROMPTS[0], p, lora_request=LoRARequest("qv", 1, adapters["qv-r4"][0])).outputs[0].token_ids
    assert ok == peft_greedy(adapters["qv-r4"][1], PROMPTS[0], 4)
    assert not llm.engine.has_unfinished_requests()


def test_allowed_dirs_enforced(tiny_llama, adapters, tmp_path):
    from loraserve.inference.lora.manager import AdapterAccessError

    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=16),
              allowed_lora_dirs=[str(tmp_path)])
    with pytest.raises(AdapterAccessError, match="not under an allowed directory"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), lora_request=LoRARequest("a", 1, adapters["qv-r4"][0]))


def test_nemo_adapter_matches_same_weights_as_peft(tiny_llama, tmp_path):
    """A NeMo adapter (fused, group-interleaved kqv) gives the same output as its weights
    written as a PEFT adapter."""
    from loraserve.adapters.testing import make_nemo_adapter

    path, base = tiny_llama
    nemo_path = make_nemo_adapter(tmp_path / "x.nemo", r=4, seed=3,
                                  adapters=("lora_kqv_adapter", "lora_dense_attention_adapter",
                                            "lora_hto4h_adapter", "lora_4htoh_adapter"))
    from loraserve.adapters import load_adapter
    ad = load_adapter(nemo_path)
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=4, lora_alpha=4, target_modules=sorted(ad.target_modules)))
    with torch.no_grad():
        for (layer, module), (a, b) in ad.weights.items():
            block = peft_model.base_model.model.model.layers[layer]
            lin = getattr(block.self_attn if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else block.mlp,
                          module)
            lin.lora_A["default"].weight.copy_(a)
            lin.lora_B["default"].weight.copy_(b)  # lora_alpha == r: peft's scale is 1, as folded in B
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8))
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = llm.generate(PROMPTS[2], p, lora_request=LoRARequest("nemo", 1, str(nemo_path), "nemo")).outputs[0].token_ids
    assert out == peft_greedy(peft_model, PROMPTS[2], 8)
    assert out != peft_greedy(base, PROMPTS[2], 8)


def test_waiting_adapter_is_not_starved(tiny_llama, adapters):
    """One GPU slot, a steady stream of requests for adapter A, and one request for B: B must
    get the slot after the A requests that came before it, not wait forever."""
    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=16, max_loras=1),
              max_num_seqs=4)
    eng = llm.engine
    a = LoRARequest("qv-r4", 1, adapters["qv-r4"][0])
    b = LoRARequest("all-r8", 2, adapters["all-r8"][0])
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    eng.add_request("a0", PROMPTS[0], p, a)
    eng.step()
    eng.add_request("b", PROMPTS[1], p, b)
    done_b_at = None
    for step in range(200):
        eng.add_request(f"a{step + 1}", PROMPTS[0], p, a)  # new A work arrives every step
        for out in eng.step():
            if out.request_id == "b" and out.finished:
                done_b_at = step
        if done_b_at is not None:
            break
    # at most max_slot_bypass newer A requests go ahead of B; without the bound B never runs
    assert done_b_at is not None and done_b_at < 4 * eng.lora_manager.max_slot_bypass, done_b_at
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.lora_manager.stats_dict()["device_slots_pinned"] == 0


def test_prefix_reuse_is_per_adapter(tiny_llama, adapters):
    """Cached K/V is keyed by the adapter's content digest: the same prompt under another
    adapter (or none) recomputes, under the same adapter it reuses."""
    path, base = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=16, max_loras=2))
    bm = llm.engine.block_manager
    prompt = list(range(30, 70))
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    a = LoRARequest("qv-r4", 1, adapters["qv-r4"][0])
    b = LoRARequest("all-r8", 2, adapters["all-r8"][0])
    outs = {}
    for name, lora in (("base", None), ("a", a), ("b", b)):
        outs[name] = llm.generate(prompt, p, lora_request=lora).outputs[0].token_ids
    assert bm.num_reused_blocks == 0
    assert outs["a"] == peft_greedy(adapters["qv-r4"][1], prompt, 6)
    assert outs["b"] == peft_greedy(adapters["all-r8"][1], prompt, 6)
    assert llm.generate(prompt, p, lora_request=a).outputs[0].token_ids == outs["a"]
    assert bm.num_reused_blocks == 2
    assert llm.generate(prompt, p).outputs[0].token_ids == outs["base"]
    assert bm.num_reused_blocks == 4


def test_lora_dir_preloads_adapters_addressable_by_id(tiny_llama, adapters):
    """TensorRT-LLM: adapters in LoraConfig.lora_dir are loaded at start with ids 0, 1, ...;
    a request may then name one by lora_int_id without a path."""
    path, _ = tiny_llama
    dirs = [adapters["qv-r4"][0], adapters["all-r8"][0]]
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(lora_dir=dirs, max_lora_rank=16))
    assert llm.engine.lora_manager.stats_dict()["host_adapters"] == 2
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = llm.generate(PROMPTS[2], p, lora_request=LoRARequest("second", 1)).outputs[0].token_ids
    assert out == peft_greedy(adapters["all-r8"][1], PROMPTS[2], 6)
    with pytest.raises(LookupError, match="not loaded"):
        llm.generate(PROMPTS[2], p, lora_request=LoRARequest("nope", 9))
