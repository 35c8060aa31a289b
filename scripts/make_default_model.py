"""Train loraserve's embedded default model: a tiny Llama on Python's own standard library.

No model can be downloaded where loraserve is built and tested, so the project makes its own
base model from text every machine has: the `*.py` sources of the running interpreter's
standard library. The script

1. picks a deterministic corpus (sorted paths, test suites and data tables left out, about
   4 MB of text; every 10th file upper-cased, see SHOUTED_FILE_EVERY),
2. trains a byte-level BPE tokenizer on it with `tokenizers` (lossless: decode(encode(s)) == s
   for any string, multi-byte UTF-8 included, because every byte is in the base alphabet),
3. trains a `transformers.LlamaForCausalLM` (by default hidden 128, 4 layers, 4 query heads
   sharing 2 KV heads (GQA, head_dim 32), SwiGLU 344, tied embeddings: 1.25 M parameters) on
   random 256-token windows for a fixed number of AdamW steps with warmup + cosine decay, on CPU,
4. writes an HF-format directory: config.json, model.safetensors (bf16), tokenizer.json,
   tokenizer_config.json (with a chat template), generation_config.json.

Runs in about 5 minutes on 2 idle CPU cores (the step count is fixed, so a busy machine takes longer). Deterministic given --seed and the Python version (the
corpus is that version's standard library), as far as torch's CPU kernels are.

    python scripts/make_default_model.py            # writes models/default/
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sysconfig
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
BOS, EOS = "<s>", "</s>"
DEFAULT_CORPUS_CHARS = 4_000_000
# Every 10th file is upper-cased, so the tokenizer has merges for upper-case words and the model
# knows SHOUTED code as a register of its own. Prompts in normal case still get normal-case
# answers (the context decides); the `upper` demo adapter only has to switch the register on.
SHOUTED_FILE_EVERY = 10
# Test suites are huge and repetitive; the rest are data tables or generated code, not Python style.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3",
                           "encodings", "pydoc_data", "ensurepip", "turtledemo", "__pycache__"})
# Pre-token pieces: a newline with the indentation after it; an identifier, a number or a run of
# punctuation, each with at most one trailing space; other whitespace. Spaces attach to the token
# BEFORE them (GPT-2 attaches them to the one after), so a prompt that ends in a space, such as
# "def ", tokenizes exactly as it does inside the training text.
PRE_TOKEN_PATTERN = (r"\r?\n[^\S\r\n]*|[\p{L}_][\p{L}\p{N}_]*[^\S\r\n]?|\p{N}{1,3}[^\S\r\n]?"
                     r"|[^\s\p{L}\p{N}_]+[^\S\r\n]?|[^\S\r\n]+|\s")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '# ' + message['role'] + ':\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '# assistant:\\n' }}{% endif %}"
)


def stdlib_texts() -> list[str]:
    """Texts of the running interpreter's stdlib *.py files (minus EXCLUDED_DIRS), in sorted path order."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(stdlib.rglob("*.py")):
        if EXCLUDED_DIRS.intersection(path.relative_to(stdlib).parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
    return texts


def take_chars(texts: list[str], max_chars: int) -> list[str]:
    """The shortest prefix of `texts` holding at least `max_chars` characters (or all of them)."""
    total = 0
    for i, text in enumerate(texts):
        total += len(text)
        if total >= max_chars:
            return texts[:i + 1]
    return list(texts)


def shout_some(texts: list[str], every: int = SHOUTED_FILE_EVERY) -> list[str]:
    """Upper-case files every-1, 2*every-1, ... and leave the rest as they are."""
    return [text.upper() if i % every == every - 1 else text for i, text in enumerate(texts)]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: no normalizer and all 256 bytes in the alphabet, so every string round-trips
    exactly. Ids 0 and 1 are <s> and </s>; the post-processor prepends <s> like Llama's tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One long int64 stream: <s> doc </s> <s> doc </s> ..."""
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += [bos, *encoding.ids, eos]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """[batch_size, seq_len + 1] windows at uniform random offsets (inputs = [:, :-1], targets = [:, 1:])."""
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine decay to `final_frac * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms' gains)."""
    decay = [p for _, p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for _, p in params if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def next_token_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Cross entropy (nats) of predicting windows[:, 1:] from windows[:, :-1]; windows: [B, T + 1]."""
    logits = model(input_ids=windows[:, :-1]).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())


@torch.no_grad()
def mean_loss(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, max_windows: int = 32) -> float:
    """Mean next-token cross entropy (nats) over consecutive windows of `stream`."""
    model.eval()
    n = min(max_windows, (stream.numel() - 1) // seq_len)
    windows = torch.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
    loss = next_token_loss(model, windows)
    model.train()
    return float(loss)


def train_loop(model: torch.nn.Module, stream: torch.Tensor, *, steps: int, batch_size: int, seq_len: int,
               lr: float, warmup: int, weight_decay: float, seed: int, log_every: int = 10) -> float:
    """AdamW on random windows of `stream`; returns the mean training loss of the last 10 steps."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(list(model.named_parameters()), lr, weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    recent: list[float] = []
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        batch = random_windows(stream, batch_size, seq_len, gen)
        loss = next_token_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-10:]
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:4d}/{steps}  loss {loss.item():.3f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{time.time() - start:6.1f}s", flush=True)
    return sum(recent) / len(recent)


def greedy_sample(model: LlamaForCausalLM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of `prompt` (prompt included), decoded."""
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.token_to_id(EOS))
    return tokenizer.decode(out[0].tolist())


def write_tokenizer_files(tokenizer: Tokenizer, out: pathlib.Path, max_length: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": None, "unk_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # would break the exact round trip
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def add_legacy_config_keys(config_path: pathlib.Path) -> None:
    """transformers 5 writes `dtype` and `rope_parameters`; most checkpoints in the wild (and readers
    written for them) use the 4.x keys `torch_dtype` and `rope_theta`. Write both spellings."""
    config = json.loads(config_path.read_text())
    config.setdefault("torch_dtype", config.get("dtype", "bfloat16"))
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "models" / "default")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--corpus-chars", type=int, default=DEFAULT_CORPUS_CHARS)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--shout-every", type=int, default=SHOUTED_FILE_EVERY)
    # Width 128 rather than 256: at a fixed CPU budget the smaller model sees 2.3x the tokens and
    # ends at a clearly lower loss (about 4.2 vs 4.8 nats held out), and every CPU test gets faster.
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=344)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    texts = shout_some(take_chars(stdlib_texts(), args.corpus_chars), args.shout_every)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    stream = encode_documents(tokenizer, texts)
    held_out = stream.numel() // 50  # last 2% scores the model; training never sees it
    train_stream, eval_stream = stream[:-held_out], stream[-held_out:]
    print(f"corpus: {len(texts)} files, {sum(map(len, texts)) / 1e6:.2f} M chars, {stream.numel() / 1e6:.2f} M tokens "
          f"({sum(map(len, texts)) / stream.numel():.2f} chars/token); tokenizer {time.time() - t0:.1f}s", flush=True)

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=tokenizer.token_to_id(BOS), eos_token_id=tokenizer.token_to_id(EOS), pad_token_id=None)
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)

    final_loss = train_loop(model, train_stream, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                            lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, seed=args.seed)
    model = model.to(torch.bfloat16)
    eval_loss = mean_loss(model.float(), eval_stream, args.seq_len)  # scored with the bf16-rounded weights
    print(f"final train loss {final_loss:.3f}  held-out loss {eval_loss:.3f} (bf16 weights)", flush=True)

    for prompt in ("def ", "import os\n\n\nclass ", "    def __init__(self"):
        print(f"--- sample {prompt!r}\n{greedy_sample(model, tokenizer, prompt)}\n---", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, do_sample=False,
                     max_new_tokens=64).save_pretrained(args.out)
    add_legacy_config_keys(args.out / "config.json")
    write_tokenizer_files(tokenizer, args.out, config.max_position_embeddings)
    print(f"wrote {args.out} in {time.time() - t0:.1f}s total", flush=True)


if __name__ == "__main__":
    main()
