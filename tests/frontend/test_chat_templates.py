"""Chat templates and prompt encoding equal transformers' AutoTokenizer token for token (issue 13.3),
on Llama-3, Qwen2 and Mistral template styles; then through LLM.chat and LLM.generate end to end."""
from __future__ import annotations

import pytest

from loraserve.inference.chat_template import ChatTemplate, ChatTemplateError
from loraserve.inference.detokenizer import TokenizerWrapper

from .chat_models import STYLES, write_tokenizer

transformers = pytest.importorskip("transformers")

CHATS = {
    "llama3": [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hello, how are you?"}],
    "qwen2": [{"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "jumps"},
              {"role": "user", "content": "Größe café 東京"}],
    "mistral": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Be brief."},
                {"role": "user", "content": "def main(): return 42"}],
}
TEXTS = ["The quick brown fox", " leading space", "Größe café\n東京"]


def hf_chat_ids(hf, messages, **kw) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


@pytest.fixture(scope="module", params=STYLES)
def style_dir(request, tmp_path_factory):
    return request.param, write_tokenizer(str(tmp_path_factory.mktemp(request.param)), request.param)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_equal_transformers(style_dir, add_generation_prompt):
    style, path = style_dir
    ours, hf = TokenizerWrapper(path), transformers.AutoTokenizer.from_pretrained(path)
    msgs = CHATS[style]
    assert ours.apply_chat_template(msgs, add_generation_prompt) == hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = ours.encode_chat(msgs, add_generation_prompt)
    assert ids == hf_chat_ids(hf, msgs, add_generation_prompt=add_generation_prompt)
    if ours.bos_token_id is not None and "bos_token" in ours.chat_template.source:
        assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id  # no double BOS


def test_text_prompts_get_the_bos_the_tokenizer_adds(style_dir):
    style, path = style_dir
    ours, hf = TokenizerWrapper(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
    # llama3 adds BOS through tokenizer.json's post-processor, mistral through add_bos_token: both must show
    assert ours.encode("Hello")[0] == ours.bos_token_id if style != "qwen2" else ours.bos_token_id is None


def test_fallback_environment_renders_like_transformers(style_dir):
    """The jinja environment used where transformers is not installed (the GPU image may lack it)."""
    style, path = style_dir
    ours, hf = TokenizerWrapper(path), transformers.AutoTokenizer.from_pretrained(path)
    plain = ChatTemplate(ours.chat_template.source, ours.chat_template.special_tokens, use_transformers=False)
    for add in (True, False):
        assert plain.render(CHATS[style], add) == hf.apply_chat_template(CHATS[style], tokenize=False,
                                                                          add_generation_prompt=add)


@pytest.mark.parametrize("use_transformers", [True, False])
def test_tojson_does_not_html_escape(tmp_path, use_transformers):
    path = write_tokenizer(str(tmp_path / "q"), "qwen2")
    ours, hf = TokenizerWrapper(path), transformers.AutoTokenizer.from_pretrained(path)
    tools = [{"type": "function", "function": {"name": "f", "description": "a <b> & 'c' → é"}}]
    msgs = [{"role": "user", "content": "hi"}]
    tpl = ChatTemplate(ours.chat_template.source, ours.chat_template.special_tokens, use_transformers)
    text = tpl.render(msgs, True, tools=tools)
    assert "a <b> & 'c' → é" in text and "&lt;" not in text and "\\u" not in text
    assert text == hf.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("use_transformers", [True, False])
def test_raise_exception_is_a_clear_error(tmp_path, use_transformers):
    path = write_tokenizer(str(tmp_path / "m"), "mistral")
    ours = TokenizerWrapper(path)
    tpl = ChatTemplate(ours.chat_template.source, ours.chat_template.special_tokens, use_transformers)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tpl.render([{"role": "assistant", "content": "x"}], True)
    with pytest.raises(ChatTemplateError, match="Only user and assistant"):
        ours.encode_chat([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])
    with pytest.raises(ValueError):  # ChatTemplateError is a ValueError: the fronts map it to 400 / INVALID_ARGUMENT
        ours.encode_chat([])


def test_llm_chat_and_generate_match_transformers_end_to_end(tmp_path):
    """LLM.chat sends transformers' chat ids, LLM.generate(text) transformers' text ids (with BOS)."""
    from loraserve import LLM, SamplingParams
    from tests.inference.conftest import make_random_model

    path = str(tmp_path / "mistral")
    make_random_model(path, "mistral", bos_token_id=1, eos_token_id=2)
    write_tokenizer(path, "mistral")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    llm = LLM(path, dtype="float32", device="cpu")
    p = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    msgs = CHATS["mistral"]
    assert llm.chat(msgs, p).prompt_token_ids == hf_chat_ids(hf, msgs, add_generation_prompt=True)
    assert llm.generate("The quick brown fox", p).prompt_token_ids == hf("The quick brown fox")["input_ids"]


def test_openai_chat_front_uses_the_same_ids_and_maps_raise_exception_to_400(tmp_path):
    """/v1/chat/completions prompt_tokens = len(transformers' chat ids); a template's raise_exception is a 400
    carrying the template's own message (before: jinja's "'raise_exception' is undefined")."""
    import json
    import urllib.error
    import urllib.request

    from loraserve.inference.serve_config import ServeConfig
    from loraserve.inference.testing import RunningInference
    from tests.inference.conftest import make_random_model

    path = str(tmp_path / "mistral")
    make_random_model(path, "mistral", bos_token_id=1, eos_token_id=2)
    write_tokenizer(path, "mistral")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    cfg = ServeConfig(model=path, port=0, openai_port=0, registry_address=None,
                      adapter_cache_dir=str(tmp_path / "cache"), llm_kwargs=dict(dtype="float32", device="cpu"))

    def chat(url, messages):
        body = json.dumps({"model": "default", "messages": messages, "max_tokens": 2, "temperature": 0}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    with RunningInference(cfg) as srv:
        url = f"http://127.0.0.1:{srv.running.openai.port}/v1/chat/completions"
        status, body = chat(url, CHATS["mistral"])
        assert status == 200 and body["usage"]["prompt_tokens"] == len(
            hf_chat_ids(hf, CHATS["mistral"], add_generation_prompt=True))
        status, body = chat(url, [{"role": "assistant", "content": "x"}])
        assert status == 400 and "roles must alternate" in body["error"]["message"]
