"""Random requests for the reliability fuzz: GenerateRequests and OpenAI HTTP bodies drawn from
values at and beyond every edge (the server must answer each with a canonical status)."""
from __future__ import annotations

import json
import random

from loraserve.v1 import inference_pb2 as pb

I32_MAX, I32_MIN, I64_MAX = 2**31 - 1, -2**31, 2**63 - 1
VOCAB = 4096  # models/default

# field -> (valid values at the edges, invalid values); a request starts valid and gets 0-3 edits,
# three in four of them to a valid extreme, so that most requests reach the sampler
EDGES = {
    "temperature": ([0.0, -0.0, 1e-38, 1e-30, 1e-6, 0.01, 2.0, 100.0, 1e10, 1e38, 3.4e38, float("inf")],
                    [float("nan"), float("-inf"), -1.0, -1e-38]),
    "top_p": ([1.0, 0.9, 0.5, 1e-6, 1e-38], [0.0, -0.0, -0.5, 1.0000001, 2.0, float("nan"), float("inf")]),
    "top_k": ([0, -1, 1, 2, 40, VOCAB - 1, VOCAB, VOCAB + 1, 10**6, I32_MAX], [-2, I32_MIN]),
    "max_tokens": ([1, 2, 16, 64], [0, -1, I32_MIN]),
    "min_tokens": ([0, 1, 4, 16], [-1, I32_MIN]),
    "top_logprobs": ([0, 1, 5, 20], [21, -1, I32_MAX]),
    "seed": ([0, 1, -1, I64_MAX, -I64_MAX - 1, 12345], []),
}
LONG_RUNNERS = {"max_tokens": [2048, I32_MAX], "min_tokens": [I32_MAX]}  # run to the context's end (rare)
TOKEN_IDS = [0, 1, 2, 100, VOCAB - 1, VOCAB, VOCAB + 7, -1, I32_MAX, I32_MIN]

BAD_REFS = [("../../etc/passwd", 0, ""), ("evil\x00name", 0, ""), ("x" * 10_000, 0, ""), ("ok", -1, ""),
            ("ok", 2, "prod"), ("ok", 0, "../x"), ("", 0, ""), ("no-such-adapter", 0, ""), ("rand-0", 99, ""),
            ("rand-0", I64_MAX, ""), ("rand-0", 0, "no-such-alias"), ("a/b/c", 0, ""), ("ünïcode", 0, ""),
            ("rand-0", 0, "latest"), ("rand-0", 1, "")]


def random_text(rng: random.Random, n: int) -> str:
    pools = ["abc def ghi\n", "def main():\n    return 1\n", "\x00\x01\x7f", "ünïcödé 漢字 🙂", "\ud7ff\ue000",
             "<s></s>", "%s{}{0}\\n"]
    out, size = [], 0
    while size < n:
        out.append(rng.choice(pools))
        size += len(out[-1])
    return "".join(out)[:n]


def random_prompt(rng: random.Random, req: pb.GenerateRequest) -> None:
    roll = rng.random()
    if roll < 0.03:
        return  # no prompt
    if roll < 0.4:
        n = rng.choice((1, 5, 40, 200)) if rng.random() < 0.9 else rng.choice((0, 3000, 100_000))
        req.text = random_text(rng, n)
        return
    n = rng.choice((1, 3, 16, 64)) if rng.random() < 0.9 else rng.choice((0, 512, 2047, 2048, 4000))
    ids = [rng.randrange(2, VOCAB) for _ in range(n)]
    if ids and rng.random() < 0.1:
        ids[rng.randrange(len(ids))] = rng.choice(TOKEN_IDS)
    req.token_ids.CopyFrom(pb.TokenIds(ids=ids))


def random_sampling(rng: random.Random) -> pb.SamplingParams:
    p = pb.SamplingParams(max_tokens=rng.randrange(1, 12), temperature=rng.choice((0.0, 0.7, 1.0)))
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
        field = rng.choice(list(EDGES))
        valid, invalid = EDGES[field]
        pool = valid if rng.random() < 0.75 or not invalid else invalid
        setattr(p, field, rng.choice(pool))
    if rng.random() < 0.02:
        field = rng.choice(list(LONG_RUNNERS))
        setattr(p, field, rng.choice(LONG_RUNNERS[field]))
    if rng.random() < 0.15:
        p.stop.extend(rng.choice([[""], ["a"], ["\n"], ["x" * 5000], ["ü", "🙂"], [str(i) for i in range(300)]]))
    if rng.random() < 0.15:
        p.stop_token_ids.extend(rng.choice([[1], [0, 2], [-1], [VOCAB], [I32_MAX], list(range(500))]))
    p.ignore_eos = rng.random() < 0.5
    if rng.random() < 0.2:
        p.logprobs = rng.choice((0, 1, 5, 20) if rng.random() < 0.8 else (21, -1, I32_MAX))
    p.legacy_logprobs = rng.random() < 0.05
    p.include_stop_str_in_output = rng.random() < 0.2
    return p


def random_adapter(rng: random.Random, req, stack) -> None:
    roll = rng.random()
    if roll < 0.4:
        return
    if roll < 0.65:
        req.adapter_ref.name = rng.choice(stack.registry_names)
    elif roll < 0.75:
        i = rng.randrange(len(stack.local_adapters))
        req.lora_request.CopyFrom(pb.LoraRequest(lora_name=f"local-{i}", lora_int_id=1000 + i,
                                                 lora_path=stack.local_adapters[i]))
    elif roll < 0.9:
        name, version, alias = rng.choice(BAD_REFS)
        req.adapter_ref.CopyFrom(pb.AdapterRef(name=name, version=version, alias=alias))
    else:
        path = rng.choice([*stack.local_adapters, *stack.broken_adapters, str(stack.allowed / "missing"),
                           "/etc/passwd", "relative/path", str(stack.allowed) + "/../..", "\x00",
                           str(stack.allowed) + "/x" * 3000, ""])
        req.lora_request.CopyFrom(pb.LoraRequest(
            lora_name=rng.choice(["a", "", "x" * 1000, "n\x00"]), lora_int_id=rng.choice([0, 1, 77, -1, I64_MAX]),
            lora_path=path, lora_ckpt_source=rng.choice(["", "hf", "nemo", "pickle"])))


def random_generate_request(rng: random.Random, stack) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    random_prompt(rng, req)
    if rng.random() < 0.95:
        req.sampling_params.CopyFrom(random_sampling(rng))
    random_adapter(rng, req, stack)
    if rng.random() < 0.05:
        req.request_id = rng.choice(["dup", "x" * 5000, "ü\x00"])
    return req


# ---- HTTP ------------------------------------------------------------------------------------------
JSON_VALUES = [None, True, False, 0, -1, 1, 2**53, -2**63, 10**30, 1e-38, 1e38, 1e308, float("nan"), float("inf"),
               float("-inf"), "", "x", "1", [], [1], {}, {"a": 1}, "ü" * 100]


def random_http_body(rng: random.Random, stack, chat: bool) -> dict:
    body: dict = {}
    model_roll = rng.random()
    if model_roll < 0.4:
        body["model"] = rng.choice(["", "default", "models/default"])
    elif model_roll < 0.65:
        body["model"] = rng.choice(stack.registry_names) + rng.choice(["", "", ":1", ":latest", ":0", ":-1", ":x"])
    elif model_roll < 0.8:
        body["model"] = rng.choice(["../../etc/passwd", "a\x00b", "x" * 10_000, ":", "a:b:c", "no-such", 5, None])
    if chat and rng.random() < 0.8:
        body["messages"] = [{"role": "user", "content": random_text(rng, rng.randrange(1, 100))}]
    elif not chat and rng.random() < 0.8:
        body["prompt"] = rng.choice([random_text(rng, rng.randrange(1, 100)),
                                     [rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 32))]])
    elif chat:
        body["messages"] = rng.choice([
            [{"role": "user", "content": random_text(rng, rng.choice((0, 10, 200)))}],
            [], [{"role": "user"}], [{"content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "hello", None,
            [{"role": "system", "content": "s"}, {"role": "user", "content": "x" * 50_000}]])
    else:
        body["prompt"] = rng.choice([random_text(rng, rng.choice((0, 5, 100, 20_000))), [], [1, 2, 3], [[1, 2], [3]],
                                     [VOCAB + 5], [-1], ["a", "b"], [[]], None, 7, [1, "a"]])
    # a valid body, then 0-3 edits: valid extremes mostly, wrong types and bad values sometimes
    body["max_tokens"] = rng.randrange(1, 10)
    body["temperature"] = rng.choice((0.0, 0.7, 1.0))
    extra = {"n": ([1, 2, 3], [0, -1, 129, 10**6]), "stream": ([True, False], ["yes"]),
             "stop": ([None, "a", ["\n"], ["x"] * 300], ["", [""], 5]), "echo": ([True, False], []),
             "logprobs": ([None, 0, 5, 20, True, False], [21, -1]), "ignore_eos": ([True, False], []),
             "stop_token_ids": ([[1], [VOCAB]], [[-1], "x"]), "presence_penalty": ([0], [0.5]),
             "logit_bias": ([{}], [{"1": 5}]), "best_of": ([1], [2]), "unknown_field": ([], [1]),
             "stream_options": ([{"include_usage": True}, None], [{"x": 1}]),
             "lora_request": ([{"lora_name": "local-0", "lora_int_id": 1000, "lora_path": stack.local_adapters[0]}],
                              [{"lora_name": "b", "lora_int_id": 1, "lora_path": stack.broken_adapters[0]},
                               {"lora_name": "x", "lora_int_id": -1}, {"lora_name": "x", "lora_path": "\x00"},
                               {"lora_name": "x", "lora_int_id": 2, "lora_path": "/etc"}, {"bad": 1}, "x"])}
    fields = {**{k: (v, bad) for k, (v, bad) in EDGES.items()}, **extra}
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        name = rng.choice(list(fields))
        valid, invalid = fields[name]
        roll = rng.random()
        if roll < 0.65 and valid:
            body[name] = rng.choice(valid)
        elif roll < 0.9 and invalid:
            body[name] = rng.choice(invalid)
        else:
            body[name] = rng.choice(JSON_VALUES)
    if rng.random() < 0.01:
        body["max_tokens"] = rng.choice([2048, 10**9])
    return body


def random_http_call(rng: random.Random, stack) -> tuple[str, str, bytes | None]:
    roll = rng.random()
    if roll < 0.03:
        return "GET", rng.choice(["/v1/models", "/health", "/nope", "/v1/completions"]), None
    path = "/v1/chat/completions" if roll < 0.5 else "/v1/completions"
    if roll > 0.97:
        return "POST", path, rng.choice([b"", b"{", b"\xff\xfe\x00", b"[]", b"null", b'{"prompt": "a"' * 1000,
                                         b'{"a":' * 100_000])
    body = random_http_body(rng, stack, chat=path.endswith("chat/completions"))
    return "POST", path, json.dumps(body, allow_nan=True).encode()
