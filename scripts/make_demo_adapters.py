"""Train loraserve's demo LoRA adapters on top of the default model (models/default).

Two HF PEFT adapters whose effect is visible at a glance, so a demo can send one prompt three
times (no adapter, `upper`, `comments`) and show three different answers:

- `upper`: the standard-library text UPPER-CASED; generations with it SHOUT. LoRA on every
  projection (q, k, v, o, gate, up, down), r=8, alpha=16.
- `comments`: continues code as commented-out code. Trained on 6-line snippets of the standard
  library whose first line is code and whose other lines are commented out ("# " + line), so
  after the prompt's line, generations with it come out as `#` lines. LoRA on q_proj and v_proj
  only, r=4, rsLoRA (scale alpha/sqrt(r)).

Each is trained from a fixed seed for a fixed number of AdamW steps on CPU (about 3 minutes
for both on 2 idle cores) on files the base model never saw (the next slice of the sorted stdlib), and
written with `save_pretrained` as adapter_config.json + adapter_model.safetensors (fp32).

    python scripts/make_demo_adapters.py            # writes models/adapters/{upper,comments}/
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

import make_default_model as base  # same folder: the corpus, the training loop, sampling

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLE_PROMPTS = ("def ", "import os\n\n\nclass ", "    def __init__(self")
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def comment_out(line: str) -> str:
    """A line commented out as an editor does it: "# " + line, and "#" for an empty line."""
    return f"# {line}" if line else "#"


def commented_snippets(text: str, lines_per_snippet: int = 6) -> list[str]:
    """The file cut into snippets of `lines_per_snippet` lines, each kept as code on its first line
    and commented out after it: every snippet shows the switch from a code prompt to `#` lines."""
    lines = text.split("\n")
    snippets = []
    for start in range(0, len(lines), lines_per_snippet):
        first, *rest = lines[start:start + lines_per_snippet]
        snippets.append("\n".join([first, *map(comment_out, rest)]))
    return snippets


def shouted(text: str) -> list[str]:
    return [text.upper()]


@dataclasses.dataclass(frozen=True, slots=True)
class AdapterRecipe:
    name: str
    transform: Callable[[str], list[str]]  # one source file -> training documents
    lora: LoraConfig
    max_chars: int  # of source text, before `transform`
    steps: int
    lr: float


RECIPES = (
    AdapterRecipe("upper", shouted,
                  LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_PROJECTIONS,
                             task_type="CAUSAL_LM"),
                  max_chars=2_000_000, steps=400, lr=3e-3),
    AdapterRecipe("comments", commented_snippets,
                  LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                             use_rslora=True, task_type="CAUSAL_LM"),
                  max_chars=2_000_000, steps=400, lr=8e-3),
)


def point_at_default_model(config_path: pathlib.Path) -> None:
    """PEFT records the base model's absolute local path; record the repo-relative one instead, so the
    committed file does not name the machine it was trained on."""
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "models/default"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train_adapter(recipe: AdapterRecipe, base_dir: pathlib.Path, tokenizer: Tokenizer, texts: list[str],
                  out_dir: pathlib.Path, *, batch_size: int, seq_len: int, seed: int) -> None:
    torch.manual_seed(seed)
    transformed = [doc for text in base.take_chars(texts, recipe.max_chars) for doc in recipe.transform(text)
                   if doc.strip()]
    stream = base.encode_documents(tokenizer, transformed)
    print(f"[{recipe.name}] {sum(map(len, transformed)) / 1e6:.2f} M chars, {stream.numel() / 1e6:.2f} M tokens",
          flush=True)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, recipe.lora)
    model.print_trainable_parameters()
    final = base.train_loop(model, stream, steps=recipe.steps, batch_size=batch_size, seq_len=seq_len,
                            lr=recipe.lr, warmup=10, weight_decay=0.0, seed=seed)
    print(f"[{recipe.name}] final train loss {final:.3f}", flush=True)
    adapter_dir = out_dir / recipe.name
    model.save_pretrained(adapter_dir, safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    point_at_default_model(adapter_dir / "adapter_config.json")
    for prompt in SAMPLE_PROMPTS:
        print(f"--- [{recipe.name}] sample {prompt!r}\n{base.greedy_sample(model, tokenizer, prompt)}\n---", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=pathlib.Path, default=ROOT / "models" / "default")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "models" / "adapters")
    parser.add_argument("--only", choices=[r.name for r in RECIPES], action="append")
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_file(str(args.base / "tokenizer.json"))
    # Files after the base model's corpus, so the adapters learn the style, not memorised text.
    all_texts = base.stdlib_texts()
    texts = all_texts[len(base.take_chars(all_texts, base.DEFAULT_CORPUS_CHARS)):]
    for recipe in RECIPES:
        if args.only and recipe.name not in args.only:
            continue
        start = time.time()
        train_adapter(recipe, args.base, tokenizer, texts, args.out, batch_size=args.batch_size,
                      seq_len=args.seq_len, seed=args.seed)
        print(f"[{recipe.name}] {time.time() - start:.1f}s", flush=True)
    print(f"wrote {args.out} in {time.time() - t0:.1f}s total", flush=True)


if __name__ == "__main__":
    main()
