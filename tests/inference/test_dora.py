"""DoRA adapters (PEFT use_dora=True) served unmerged, against transformers + PEFT (issue 16).

Each DoRA module's output is g * (x W^T + s x A^T B^T), g = m / ||W + s B@A||_row computed once at
load from the base weights; plain LoRA and base rows in the same batch are untouched."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve import LLM, LoraConfig, LoRARequest, SamplingParams
from loraserve.adapters import AdapterFormatError, load_adapter

from .test_multi_lora import peft_adapter_with_random_weights, peft_greedy

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DORA = {
    "dora-all-r8": dict(r=8, lora_alpha=16, target_modules=ALL, use_dora=True),
    "dora-all-r4": dict(r=4, lora_alpha=4, target_modules=ALL, use_dora=True),
    "dora-qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    "dora-qv-r8": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"], use_dora=True),
}
PLAIN = {"lora-all-r8": dict(r=8, lora_alpha=16, target_modules=ALL)}
PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 41)), [3] * 7]


# PEFT default lora_dropout is 0.0; the same helper perturbs DoRA magnitudes
peft_dora_adapter = peft_adapter_with_random_weights


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    _, base = tiny_llama
    out = {}
    for i, (name, kw) in enumerate({**DORA, **PLAIN}.items()):
        d = str(tmp_path_factory.mktemp(name))
        out[name] = (d, peft_dora_adapter(base, d, seed=300 + i, **kw))
    return out


@pytest.fixture(scope="module")
def peft_reference(tiny_llama, adapters):
    """(adapter name or None, prompt) -> PEFT's greedy 8 tokens, computed once per module."""
    _, base = tiny_llama
    return {(name, tuple(p)): peft_greedy(base if name is None else adapters[name][1], p, 8)
            for name in [None, *adapters] for p in PROMPTS}


@pytest.mark.parametrize("max_loras", [8, 2])
def test_dora_mixed_batch_matches_peft(tiny_llama, adapters, peft_reference, max_loras):
    """DoRA (4 adapters), plain LoRA and base requests in one batch; max_loras=2 makes DoRA and
    plain adapters take turns on the same GPU slots (a slot's g must be reset on reuse)."""
    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu",
              lora_config=LoraConfig(max_lora_rank=8, max_loras=max_loras, max_cpu_loras=8))
    reqs = [None] + [LoRARequest(name, i + 1, d) for i, (name, (d, _)) in enumerate(adapters.items())]
    prompts, loras = [], []
    for prompt in PROMPTS:
        for r in reqs:
            prompts.append(prompt)
            loras.append(r)
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), lora_request=loras)
    differs = 0
    for prompt, lora, out in zip(prompts, loras, outs):
        expected = peft_reference[(lora and lora.lora_name, tuple(prompt))]
        assert out.outputs[0].token_ids == expected, (lora and lora.lora_name, prompt)
        differs += expected != peft_reference[(None, tuple(prompt))]
    assert differs >= len(PROMPTS) * len(DORA), "the adapters barely change the output: the test would be vacuous"
    assert llm.engine.lora_manager.stats_dict()["device_slots_pinned"] == 0


def test_dora_factor_matches_peft_layers(tiny_llama, adapters):
    """Per module: g * (x W^T + x A^T B^T) from our load equals PEFT's DoRA layer output, and g != 1."""
    from loraserve.inference.lora.dora import base_projection, compute_dora_scales
    from tests.adapters.peft_helpers import peft_lora_layers

    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8, max_loras=2))
    model = llm.engine.model
    for name in DORA:
        d, peft_model = adapters[name]
        adapter = load_adapter(d)
        assert adapter.is_dora and not adapter.dora_scales
        compute_dora_scales(adapter, model)
        layers = peft_lora_layers(peft_model)
        assert set(adapter.dora_scales) == set(layers) == set(adapter.weights)
        gen = torch.Generator().manual_seed(1)
        for key, layer in layers.items():
            a, b = adapter.weights[key]
            g = adapter.dora_scales[key]
            lin, lo, hi = base_projection(model, *key)
            x = torch.randn(6, a.shape[1], generator=gen)
            got = g * (x @ lin.weight[lo:hi].T + x @ a.T @ b.T)
            with torch.no_grad():
                expected = layer(x)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} {key}: {m}")
            assert (g - 1).abs().max() > 0.05, f"{name} {key}: g ~ 1, the check would be vacuous"


def _rewrite(src: str, dst, tensors=None, config=None):
    os.makedirs(dst, exist_ok=True)
    t = load_file(os.path.join(src, "adapter_model.safetensors"))
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    t = tensors(t) if tensors else t
    cfg = config(cfg) if config else cfg
    save_file(t, os.path.join(dst, "adapter_model.safetensors"))
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def _edit_magnitude(fn):
    def edit(t):
        key = next(k for k in sorted(t) if k.endswith("q_proj.lora_magnitude_vector"))
        return {**t, key: fn(t[key])}
    return edit


def _nan(m):
    m = m.clone()
    m[3] = float("nan")
    return m


@pytest.mark.parametrize("case,edit,message", [
    ("short", dict(tensors=_edit_magnitude(lambda m: m[:-1].clone())), r"lora_magnitude_vector has shape \[63\], expected \[64\]"),
    ("2d", dict(tensors=_edit_magnitude(lambda m: m[None].clone())), r"lora_magnitude_vector has shape \[1, 64\]"),
    ("nan", dict(tensors=_edit_magnitude(_nan)), r"lora_magnitude_vector has non-finite values"),
    ("missing", dict(tensors=lambda t: {k: v for k, v in t.items() if not k.endswith("v_proj.lora_magnitude_vector")}),
     r"no lora_magnitude_vector for \[\(0, 'v_proj'\)"),
    ("flag-off", dict(config=lambda c: {**c, "use_dora": False}), r"lora_magnitude_vector tensors but .* use_dora=false"),
    ("flag-not-bool", dict(config=lambda c: {**c, "use_dora": "yes"}), r"use_dora='yes' must be true or false"),
])
def test_bad_dora_adapters_refused(adapters, tmp_path, case, edit, message):
    src = adapters["dora-qv-r4"][0]
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(_rewrite(src, tmp_path / case, **edit))


def test_dora_on_embeddings_refused(tiny_llama, tmp_path):
    _, base = tiny_llama
    d = str(tmp_path / "emb")
    peft_dora_adapter(base, d, seed=9, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True)
    with pytest.raises(AdapterFormatError, match=r"embed_tokens.*not supported"):
        load_adapter(d)


def test_dora_zero_norm_row_refused_at_serving(tiny_llama, adapters, tmp_path):
    """A row with W + s B@A = 0 makes PEFT's g infinite: the engine refuses the adapter, and keeps serving."""
    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8, max_loras=2))
    model = llm.engine.model
    with torch.no_grad():
        model.layers[0].self_attn.qkv_proj.weight[0].zero_()   # q row 0 of layer 0; the adapter's B row 0 too
    bad = _rewrite(adapters["dora-qv-r4"][0], tmp_path / "zero",
                   tensors=lambda t: {k: (v.clone().index_fill_(0, torch.tensor([0]), 0.0)
                                          if "layers.0.self_attn.q_proj.lora_B" in k else v) for k, v in t.items()})
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    with pytest.raises(Exception, match=r"DoRA factor .* not finite"):
        llm.generate([[5, 6]], params, lora_request=[LoRARequest("zero", 1, bad)])
    assert len(llm.generate([[5, 6]], params)[0].outputs[0].token_ids) == 2


def test_dora_on_biased_qkv_matches_peft(tmp_path_factory):
    """Qwen2 has a bias on q/k/v: DoRA scales x W^T + delta but not the bias (PEFT subtracts it
    first); the slots add (1 - g) * bias after the scale. DoRA, plain LoRA and base rows mixed."""
    from .conftest import make_random_model

    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    base = make_random_model(path, "qwen2")
    specs = {"dora-qkv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], use_dora=True),
             "dora-all-r8": dict(r=8, lora_alpha=16, target_modules=ALL, use_dora=True),
             "lora-qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])}
    models = {}
    for i, (name, kw) in enumerate(specs.items()):
        d = str(tmp_path_factory.mktemp(name))
        models[name] = (d, peft_dora_adapter(base, d, seed=500 + i, **kw))
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8, max_loras=4))
    reqs = [None] + [LoRARequest(name, i + 1, d) for i, (name, (d, _)) in enumerate(models.items())]
    prompts = [p for p in PROMPTS[:2] for _ in reqs]
    loras = [r for _ in PROMPTS[:2] for r in reqs]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), lora_request=loras)
    for prompt, lora, out in zip(prompts, loras, outs):
        ref = base if lora is None else models[lora.lora_name][1]
        assert out.outputs[0].token_ids == peft_greedy(ref, prompt, 6), (lora and lora.lora_name, prompt)
    shifts = llm.engine.lora_manager.slots.shift
    assert set(shifts) == {"qkv_proj"} and shifts["qkv_proj"].abs().max() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dora_on_gpu_graphs_and_eager_match_peft(tiny_llama, adapters, peft_reference):
    """CUDA (Triton epilogue): the CUDA-graph decode and the eager engine both equal PEFT, so the
    graphs captured before any DoRA adapter was loaded read the slots' g at replay."""
    path, _ = tiny_llama
    reqs = [None] + [LoRARequest(name, i + 1, d) for i, (name, (d, _)) in enumerate(adapters.items())]
    prompts = [p for p in PROMPTS for _ in reqs]
    loras = [r for _ in PROMPTS for r in reqs]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for eager in (False, True):
        llm = LLM(model=path, dtype="float32", device="cuda", enforce_eager=eager,
                  lora_config=LoraConfig(max_lora_rank=8, max_loras=3, max_cpu_loras=8))
        assert (llm.engine.runner.graph_runner is None) == eager
        outs = llm.generate(prompts, params, lora_request=loras)
        for prompt, lora, out in zip(prompts, loras, outs):
            assert out.outputs[0].token_ids == peft_reference[(lora and lora.lora_name, tuple(prompt))], \
                (eager, lora and lora.lora_name, prompt)
        del llm


def test_dora_keys_with_adapter_name_infix(adapters, tmp_path):
    """A raw module state dict names the tensors `lora_A.default.weight` /
    `lora_magnitude_vector.default.weight`: the same adapter as PEFT's checkpoint keys."""
    src = adapters["dora-qv-r4"][0]

    def infix(t):
        out = {}
        for k, v in t.items():
            k = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            out[k + ".default.weight" if k.endswith("lora_magnitude_vector") else k] = v
        return out

    got, want = load_adapter(_rewrite(src, tmp_path / "infix", tensors=infix)), load_adapter(src)
    assert got.magnitudes.keys() == want.magnitudes.keys() and len(got.magnitudes) == 4
    assert all(torch.equal(got.magnitudes[k], m) for k, m in want.magnitudes.items())


def test_dora_from_the_registry_over_grpc(tiny_llama, adapters, peft_reference, tmp_path):
    """Upload to the registry, fetch by name from the inference service, stream over gRPC:
    the same greedy tokens as PEFT, with a plain LoRA and a base request alongside."""
    import concurrent.futures

    import grpc

    from loraserve.inference.serve_config import ServeConfig
    from loraserve.inference.testing import RunningInference
    from loraserve.registry.client import RegistryClient
    from loraserve.registry.config import RegistryConfig
    from loraserve.registry.testing import RunningRegistry
    from loraserve.v1 import inference_pb2 as pb
    from loraserve.v1 import inference_pb2_grpc as pb_grpc

    path, _ = tiny_llama
    names = [None, "dora-all-r8", "lora-all-r8", "dora-qv-r4"]
    prompt = PROMPTS[1]

    def generate(stub, name):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=pb.SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True))
        if name:
            req.adapter_ref.name = name
        return [t for msg in stub.Generate(req, timeout=60) if msg.WhichOneof("response") == "chunk"
                for t in msg.chunk.token_ids]

    with RunningRegistry(RegistryConfig(data_dir=tmp_path / "registry")) as reg:
        with RegistryClient(reg.address) as client:
            for name in names[1:]:
                client.push(adapters[name][0], name, base_model="tiny")
        cfg = ServeConfig(model=path, port=0, registry_address=reg.address, adapter_cache_dir=str(tmp_path / "cache"),
                          llm_kwargs=dict(dtype="float32", device="cpu",
                                          lora_config=LoraConfig(max_lora_rank=8, max_loras=4)))
        with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
                got = list(pool.map(lambda n: generate(stub, n), names))
    for name, tokens in zip(names, got):
        assert tokens == peft_reference[(name, tuple(prompt))], name


def test_dora_vectors_are_accounted_in_both_tiers(tiny_llama, adapters):
    """The host tier counts m and g with A and B; the GPU tier's per-slot bytes include g."""
    from loraserve.inference.lora.slots import DeviceSlots

    path, _ = tiny_llama
    llm = LLM(model=path, dtype="float32", device="cpu", lora_config=LoraConfig(max_lora_rank=8, max_loras=2))
    lm = llm.engine.lora_manager
    hold = lm.resolve(LoRARequest("d", 1, adapters["dora-all-r8"][0]))
    h = hold.handle
    ab = sum(a.numel() * 4 + b.numel() * 4 for a, b in h.adapter.weights.values())
    vec = sum(m.numel() * 4 for m in h.adapter.magnitudes.values())
    assert len(h.adapter.dora_scales) == len(h.adapter.weights) == 14
    assert h.nbytes == ab + 2 * vec and lm.host.num_bytes == h.nbytes
    per_slot = DeviceSlots.bytes_per_slot(lm.args, lm.enabled, lm.max_rank, torch.float32)
    assert lm.slots.nbytes == per_slot * lm.num_slots
    g_bytes = lm.num_slots * lm.args.num_hidden_layers * sum(out for _, out in lm.module_shapes.values()) * 4
    assert sum(t.numel() * t.element_size() for t in lm.slots.scale.values()) == g_bytes
    hold.release()
