"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) for the paged-KV engine.

Follows HF transformers' LlamaForCausalLM numerics (RMSNorm in fp32, rotate-half RoPE,
SiLU-gated MLP) with q/k/v and gate/up fused into one matmul each, as vLLM and
nano-vllm do. Checkpoint names are mapped in `load_weights`, not in `forward`.
Each projection is a `Proj`: a plain linear plus the batch's LoRA delta (if any row of
the step has an adapter), so that adapters ride along without touching the layer code.

On CUDA with Triton the small ops run as fused kernels (loraserve.kernels: RMSNorm fused
with the residual add, SiLU-and-mul, RoPE from a cos/sin table built once per model); the
CPU path (CI) runs the same math in plain torch. Layers pass (hidden, residual) as vLLM
does, so that each residual add is fused into the following norm.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.adapters.modules import PACKED_MODULES
from loraserve.kernels import triton_available

from ..attention import attend_cached, paged_attention
from ..context import get_context

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    model_type: str
    torch_dtype: str | None
    eos_token_id: list[int]
    bos_token_id: int | None
    sliding_window: int | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        model_type = cfg.get("model_type", "")
        archs = cfg.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture: model_type={model_type!r} architectures={archs}; "
                             f"loraserve supports {sorted(SUPPORTED_MODEL_TYPES.values())}")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = cfg.get("eos_token_id")
        eos_list = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            model_type=model_type,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            eos_token_id=eos_list,
            bos_token_id=cfg.get("bos_token_id"),
            sliding_window=(cfg.get("sliding_window") if model_type == "mistral" or cfg.get("use_sliding_window")
                            else None),
        )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def lora_module_shapes(self) -> dict[str, tuple[int, int]]:
        """HF module name -> (in_features, out_features): what an adapter must match."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
                "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# Fused projections and their slices, in row order of the fused weight.
PROJ_SLICES = PACKED_MODULES  # the one table (loraserve.adapters.modules)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = args.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    if kind == "default":
        return inv_freq
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


def _fused(x: torch.Tensor) -> bool:
    """Fused Triton kernels on CUDA tensors; plain torch elsewhere (the CPU engine, CI)."""
    return x.is_cuda and triton_available()


def _env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "off", "no")


# CUDA switches of the decode-step fusions (kernels/PERF_NOTES.md, "batch-1 decode"); read at import:
# RoPE + the K/V cache write in one kernel (kernels/rope.py rope_store_kv) instead of RoPE, a copy of v
# and two index_copy_ launches per layer. On by default: H200, 32 layers at 1 token, 142.0 -> 137.6 us per
# layer, outputs bit for bit the same (LORASERVE_FUSED_ROPE_KV=0: the separate ops)
FUSED_ROPE_KV = _env_flag("LORASERVE_FUSED_ROPE_KV", "1")


def _gemv_rows() -> int:
    """Steps of up to this many tokens run their projections through kernels/gemv.py (0: cuBLAS)."""
    if not triton_available():
        return 0
    from loraserve.kernels.gemv import gemv_max_m

    return gemv_max_m()


GEMV_MAX_M = _gemv_rows()
# on the GEMV path, SiLU-and-mul inside the down projection's GEMV (no launch of its own). Off: on the
# H200 the GEMV then recomputes the activation per weight row it holds and runs at 52-66 us for down
# (cuBLAS + the SiLU kernel: 34 us)
GEMV_SILU = _env_flag("LORASERVE_GEMV_SILU", "0")
# the projections the GEMV serves. H200, 32 layers at 1 token with PDL (benchmarks/bench_gemv.py): cuBLAS
# 133.8 us per layer, GEMV for qkv/o/down 128.9, for all four 125.8 (gate_up alone: 59.4 vs cuBLAS 58.3,
# but in the chain its first weight tile streams while RMSNorm runs)
GEMV_PROJS = frozenset(os.environ.get("LORASERVE_GEMV_PROJS", "qkv_proj,o_proj,gate_up_proj,down_proj").split(","))
# ... and the LM head through the GEMV too (1-4 sampled rows)
GEMV_LM_HEAD = _env_flag("LORASERVE_GEMV_LM_HEAD", "0")
# steps of GEMV_MAX_M+1..64 tokens (batch decode) through kernels/skinny_gemm.py instead of cuBLAS (a PDL dependent,
# split-K summed in the kernel); opt-in until an engine run measures it (benchmarks/tp_layer_sweep.py --only skinny).
# LORASERVE_SKINNY_GEMM=auto: the measured shapes only (skinny_gemm.CONFIGS); 1: every shape its tiles fit
SKINNY_GEMM = os.environ.get("LORASERVE_SKINNY_GEMM", "0").strip().lower() not in ("", "0", "off", "false", "no")
# steps with prompt rows whose caller reads only each sequence's last row (Context.last_rows_only: the model
# runner's eager steps): the last layer's MLP (and the final norm) run on those rows only; its attention still
# covers every row (it writes the K/V cache). The other rows of the output are zeros. Prefill of 8 x 1024 on the
# 8B shape: one layer's MLP over 8192 rows is ~4 ms of the step's ~180 (LORASERVE_LAST_LAYER_ROWS=0: every row)
LAST_LAYER_ROWS = _env_flag("LORASERVE_LAST_LAYER_ROWS", "1")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE. One instance per model: the CUDA path reads a [P, D] cos/sin table
    built once (lazily, on the first forward: the loader sets inv_freq after construction)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(args).float(), persistent=False)
        # Positions the table covers; positions past it must not reach the CUDA path.
        self.num_positions = max(args.max_position_embeddings, 4096)
        self._cos_sin: torch.Tensor | None = None
        self._cos_sin_key: tuple | None = None

    def cos_sin_cache(self) -> torch.Tensor:
        key = (self.inv_freq.data_ptr(), self.inv_freq.device, self.num_positions)
        if self._cos_sin is None or self._cos_sin_key != key:
            if self.inv_freq.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("RoPE cos/sin table built during CUDA graph capture: run one eager step first")
            from loraserve.kernels.rope import rope_cos_sin_cache

            self._cos_sin, self._cos_sin_key = rope_cos_sin_cache(self.inv_freq, self.num_positions), key
        return self._cos_sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [N]; q [N, H, D]; k [N, KVH, D] (views of the fused qkv) -> contiguous rotated copies
        if _fused(q):
            from loraserve.kernels.rope import apply_rope

            # out of place into contiguous tensors: what attention was always given
            return apply_rope(positions, q, k, self.cos_sin_cache(),
                              torch.empty(q.shape, dtype=q.dtype, device=q.device),
                              torch.empty(k.shape, dtype=k.dtype, device=k.device))
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (N, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]

        def rot(x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            x1, x2 = xf.chunk(2, dim=-1)
            return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

        return rot(q), rot(k)


class RMSNorm(nn.Module):
    tp = None  # TPGroup when this norm follows a row-parallel layer whose all-reduce it may fuse (tp/fused_norm.py)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x) [N, H]; with a residual: (norm(x + residual), x + residual), the CUDA path in
        place (x and residual are overwritten, as vLLM's fused_add_rms_norm)."""
        if residual is not None and self.tp is not None and self.tp.defers(x):   # x: a row-parallel partial
            return self.tp.all_reduce_add_rms_norm(x, residual, self.weight, self.eps)
        if _fused(x):
            from loraserve.kernels.rmsnorm import fused_add_rms_norm, rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            residual = x + residual  # HF: hidden = residual + hidden, rounded to the dtype
            x = residual
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(x.dtype)
        return out if residual is None else (out, residual)


class Proj(nn.Linear):
    """y = x W^T (+ b) + the step's LoRA delta for this (layer, projection)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, layer_idx: int, name: str):
        super().__init__(in_features, out_features, bias=bias)
        self.layer_idx, self.proj_name = layer_idx, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = get_context().lora
        if lora is not None:  # GEMM + delta (lora/batch.py may overlap the LoRA shrink with the GEMM)
            return lora.linear(self.layer_idx, self.proj_name, x, self.weight, self.bias)
        if self._gemv_ok(x):  # 1-4 tokens: the weight-streaming GEMV (kernels/gemv.py)
            from loraserve.kernels.gemv import gemv

            return gemv(x, self.weight, self.bias)
        if SKINNY_GEMM and self.bias is None and x.shape[0] > GEMV_MAX_M and x.is_cuda:
            from loraserve.kernels.skinny_gemm import skinny_gemm, skinny_gemm_ok

            if skinny_gemm_ok(x, self.weight):
                return skinny_gemm(x, self.weight)
        return F.linear(x, self.weight, self.bias)

    def _gemv_ok(self, x: torch.Tensor) -> bool:
        return (0 < x.shape[0] <= GEMV_MAX_M and self.proj_name in GEMV_PROJS and x.is_cuda
                and x.dtype == self.weight.dtype and x.stride(-1) == 1)

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """This projection of silu(gate) * up, gate_up [N, 2I] (the MLP's down_proj); on the GEMV path
        the activation is computed inside the GEMV (no launch of its own)."""
        from loraserve.kernels.activation import silu_and_mul

        if GEMV_SILU and get_context().lora is None and self._gemv_ok(gate_up):
            from loraserve.kernels.gemv import gemv

            return gemv(gate_up, self.weight, self.bias, silu_mul=True)

        return self(silu_and_mul(gate_up))


class Attention(nn.Module):
    tp = None  # TPGroup under tensor parallelism (tp/): o_proj is row-parallel, its partial sums all-reduced

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_size, self.kv_size = args.q_size, args.kv_size
        self.qkv_proj = Proj(args.hidden_size, self.q_size + 2 * self.kv_size, args.attention_bias, layer_idx, "qkv_proj")
        self.o_proj = Proj(self.q_size, args.hidden_size, False, layer_idx, "o_proj")
        self.scale = self.head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)    # (N, H, D)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)  # (N, KVH, D)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if FUSED_ROPE_KV and type(self).attend is Attention.attend and _fused(q) and self.k_cache.dtype == q.dtype:
            # one launch: q rotated, k rotated and v written into the paged cache (what attend stores)
            from loraserve.kernels.rope import rope_store_kv

            q = rope_store_kv(positions, q, k, v, rotary.cos_sin_cache(), self.k_cache, self.v_cache,
                              get_context().slot_mapping)
            o = attend_cached(q, self.k_cache, self.v_cache, self.scale)
        else:
            q, k = rotary(positions, q, k)
            o = self.attend(q, k, v.contiguous())
        out = self.o_proj(o.reshape(-1, self.q_size))
        return out if self.tp is None or self.tp.defers(out) else self.tp.all_reduce(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (N, KVH, D) in the paged cache and attend q (N, H, D) over it; a subclass changes
        the cache format (models/fp8.py: e4m3)."""
        return paged_attention(q, k, v, self.k_cache, self.v_cache, self.scale)


class MLP(nn.Module):
    tp = None  # TPGroup under tensor parallelism: down_proj is row-parallel, its partial sums all-reduced

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.gate_up_proj = Proj(args.hidden_size, 2 * args.intermediate_size, False, layer_idx, "gate_up_proj")
        self.down_proj = Proj(args.intermediate_size, args.hidden_size, False, layer_idx, "down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (N, 2I)
        if _fused(gate_up) and isinstance(self.down_proj, Proj):   # (models/fp8.py swaps in an Fp8Proj)
            out = self.down_proj.forward_silu_mul(gate_up)
        elif _fused(gate_up):
            from loraserve.kernels.activation import silu_and_mul

            out = self.down_proj(silu_and_mul(gate_up))
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            out = self.down_proj(F.silu(gate) * up)
        return out if self.tp is None or self.tp.defers(out) else self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, layer_idx)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                rotary: RotaryEmbedding, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: this layer's input delta [N, hidden] (the embeddings when residual is None);
        returns (mlp output, residual stream before it): the next norm adds them.
        rows [R] (the model's last layer, LAST_LAYER_ROWS): after attention only these rows go on: [R, hidden]."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, rotary)
        if rows is not None:   # fresh [R, hidden] copies: the fused norm below writes in place
            x, residual = x.index_select(0, rows), residual.index_select(0, rows)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    tp = None  # TPGroup under tensor parallelism: embedding and LM head hold a vocabulary shard

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary = RotaryEmbedding(args)  # shared by all layers: one cos/sin table
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [N] (all tokens of the step, sequences back to back) -> hidden [N, hidden].
        When the step's Context says only each sequence's last row is read (last_rows_only), the other rows
        of a multi-token sequence are zeros (their last layer's MLP is never computed: LAST_LAYER_ROWS)."""
        x = self.embed_tokens(input_ids) if self.tp is None else self.tp.embed(self.embed_tokens, input_ids)
        residual = None
        rows = self._last_rows(x)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if rows is not None and i == last:
                x, residual = layer(positions, x, residual, self.rotary, rows=rows)
            else:
                x, residual = layer(positions, x, residual, self.rotary)
        hidden = self.norm(x) if residual is None else self.norm(x, residual)[0]
        if rows is None:
            return hidden
        out = hidden.new_zeros((input_ids.shape[0], hidden.shape[1]))   # [N, hidden]; only `rows` are read
        return out.index_copy_(0, rows, hidden)

    def _last_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """[B] row of each sequence's last token in this step, when the caller reads no other row and some
        sequence has more than one (else None: every row is computed). Not with adapters (the LoRA batch
        describes every row), tensor parallelism, or inside a CUDA-graph capture (static shapes)."""
        ctx = get_context()
        qlens = ctx.query_lens
        if not (LAST_LAYER_ROWS and ctx.last_rows_only) or self.tp is not None or ctx.lora is not None \
                or qlens is None or len(qlens) >= x.shape[0] or not self.layers:
            return None
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        if ctx.query_start_loc is not None and ctx.query_start_loc.device == x.device:   # [B + 1] on the device
            return ctx.query_start_loc[1:].long() - 1
        ends = torch.tensor(qlens, dtype=torch.long).cumsum(0) - 1
        return ends.to(x.device, non_blocking=True)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:  # [T, V/size] per rank -> [T, V]
            return self.tp.gather_logits(self.lm_head(hidden)).float()
        if GEMV_LM_HEAD and 0 < hidden.shape[0] <= GEMV_MAX_M and hidden.is_cuda and hidden.stride(-1) == 1 \
                and hidden.dtype == self.lm_head.weight.dtype:
            from loraserve.kernels.gemv import gemv

            return gemv(hidden, self.lm_head.weight).float()
        return self.lm_head(hidden).float()
