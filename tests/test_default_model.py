"""Properties of the committed default model and demo adapters (made by scripts/make_default_model.py
and scripts/make_demo_adapters.py), checked with HF transformers + PEFT as the reference runtime.

The thresholds are properties of the trained artifacts: if a re-run of the scripts breaks them,
the artifacts got worse, and the demo built on them would show it.
"""
from __future__ import annotations

import json
import pathlib
import random

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "default"
ADAPTERS_DIR = ROOT / "models" / "adapters"
PROMPTS = ("def ", "import os\n\n\nclass ", "    def __init__(self")
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))


def load_base():
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def base_model():
    return load_base()


def load_adapter(name: str):
    return peft.PeftModel.from_pretrained(load_base(), ADAPTERS_DIR / name).eval()


def continuation(model, tokenizer: Tokenizer, prompt: str, new_tokens: int = NEW_TOKENS) -> str:
    """Greedy continuation of `prompt`, prompt excluded."""
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.token_to_id("</s>"))
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def letters(texts: list[str]) -> list[str]:
    return [c for text in texts for c in text if c.isascii() and c.isalpha()]


def upper_fraction(texts: list[str]) -> float:
    chars = letters(texts)
    assert len(chars) >= 50, f"too few letters to judge: {texts!r}"
    return sum(c.isupper() for c in chars) / len(chars)


def comment_line_fraction(prompt_and_continuations: list[tuple[str, str]]) -> float:
    """Among lines the model began (all after the prompt's last line), the fraction starting with '#'."""
    lines = []
    for prompt, text in prompt_and_continuations:
        lines += [line for line in (prompt + text).split("\n")[prompt.count("\n") + 1:] if line.strip()]
    assert len(lines) >= 5, f"too few lines to judge: {prompt_and_continuations!r}"
    return sum(line.lstrip().startswith("#") for line in lines) / len(lines)


# --- tokenizer ---------------------------------------------------------------------------------

def random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0x1F300, 0x1F6FF), (0x10000, 0x1007F), (0x0, 0x1F)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def test_tokenizer_round_trips_arbitrary_text(tokenizer: Tokenizer) -> None:
    samples = ["def f(x):\n\treturn x  # done\r\n", "héllo wörld — 日本語 🎉 ∑ ß\u200b", "", " ", "   \n\n  x ",
               "def ", "A\x00B\x7f\U0010FFFF"]
    rng = random.Random(0)
    samples += [random_text(rng, rng.randint(1, 200)) for _ in range(200)]
    bos = tokenizer.token_to_id("<s>")
    for text in samples:
        ids = tokenizer.encode(text).ids
        assert ids[0] == bos
        assert tokenizer.decode(ids) == text
    # Bytes, not characters, are the fallback: one CJK character that never merged costs 3 tokens.
    assert 0 < len(tokenizer.encode("日", add_special_tokens=False).ids) <= 3


def test_tokenizer_files_load_in_transformers_with_chat_template() -> None:
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "héllo 日本語\n    x = 1"
    ids = hf_tokenizer(text)["input_ids"]
    assert ids[0] == hf_tokenizer.bos_token_id == 0
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert hf_tokenizer.eos_token == "</s>"
    chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": "sort a list"}], tokenize=False,
                                            add_generation_prompt=True)
    assert chat == "<s># user:\nsort a list\n# assistant:\n"


# --- model -------------------------------------------------------------------------------------

def test_config_and_weights_are_a_small_gqa_llama() -> None:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    with safe_open(MODEL_DIR / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert "lm_head.weight" not in f.keys()  # tied to embed_tokens
    assert dtypes == {"BF16"}
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert total <= 8_000_000


def test_model_predicts_unseen_python_far_better_than_chance(base_model, tokenizer: Tokenizer) -> None:
    # Written for this test, so it is in no training file. Chance is ln(4096) = 8.3 nats a token.
    snippet = ('class Stack:\n    """A last-in, first-out list."""\n\n    def __init__(self):\n'
               '        self._items = []\n\n    def push(self, item):\n        self._items.append(item)\n\n'
               '    def pop(self):\n        if not self._items:\n            raise IndexError("pop from empty stack")\n'
               '        return self._items.pop()\n')
    ids = torch.tensor([tokenizer.encode(snippet).ids])
    with torch.no_grad():
        logits = base_model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert nll < 3.5, nll


def test_greedy_generation_from_def_is_printable_python_ish_text(base_model, tokenizer: Tokenizer) -> None:
    text = continuation(base_model, tokenizer, "def ")
    assert "\ufffd" not in text  # no broken UTF-8 from stray byte tokens
    assert all(c.isprintable() or c in "\n\t" for c in text), repr(text)
    assert len(letters([text])) >= 20, repr(text)
    assert "(" in text or ":" in text, repr(text)  # it names something and goes on like code


# --- adapters ----------------------------------------------------------------------------------

def test_adapter_files_are_small_peft_loras() -> None:
    upper = json.loads((ADAPTERS_DIR / "upper" / "adapter_config.json").read_text())
    comments = json.loads((ADAPTERS_DIR / "comments" / "adapter_config.json").read_text())
    assert upper["peft_type"] == comments["peft_type"] == "LORA"
    assert set(upper["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"}
    assert upper["r"] == 8 and not upper["use_rslora"]
    assert set(comments["target_modules"]) == {"q_proj", "v_proj"}
    assert comments["r"] == 4 and comments["use_rslora"] is True
    for name in ("upper", "comments"):
        assert (ADAPTERS_DIR / name / "adapter_model.safetensors").stat().st_size < 1_000_000


def test_upper_adapter_shouts_where_the_base_model_does_not(base_model, tokenizer: Tokenizer) -> None:
    base_texts = [continuation(base_model, tokenizer, p) for p in PROMPTS]
    upper_model = load_adapter("upper")
    upper_texts = [continuation(upper_model, tokenizer, p) for p in PROMPTS]
    assert upper_fraction(base_texts) < 0.2, base_texts
    assert upper_fraction(upper_texts) > 0.8, upper_texts


def test_comments_adapter_comments_out_what_it_writes(base_model, tokenizer: Tokenizer) -> None:
    # Prompts that the base model continues with code (after `if __name__ == ` it writes comments itself).
    prompts = ("def ", "import os\n\n\nclass ", "class Foo:\n    def ", "for i in range(10):\n", "    return ")
    base = [(p, continuation(base_model, tokenizer, p, 64)) for p in prompts]
    comments_model = load_adapter("comments")
    commented = [(p, continuation(comments_model, tokenizer, p, 64)) for p in prompts]
    assert comment_line_fraction(base) < 0.2, base
    assert comment_line_fraction(commented) > 0.6, commented
