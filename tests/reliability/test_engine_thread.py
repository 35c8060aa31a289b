"""Issue 9, item 1: a caller that cancels (client gone, deadline) must never kill the engine
thread, and if the engine loop ever dies, health must say NOT_SERVING at once."""
from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from loraserve import SamplingParams
from loraserve.config import engine_config_from_kwargs
from loraserve.inference.async_llm import AsyncLLM
from loraserve.inference.engine import LLMEngine
from loraserve.inference.serve_config import ServeConfig


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine(engine_config_from_kwargs(tiny_llama[0], dtype="float32", device="cpu"))


def _block_engine_thread(llm: AsyncLLM) -> threading.Event:
    """Queue a command that holds the engine thread until the returned event is set."""
    release, entered = threading.Event(), threading.Event()

    def hold(_engine):
        entered.set()
        release.wait(10)

    llm.call(hold)
    assert entered.wait(10)
    return release


def test_cancelled_call_does_not_kill_the_engine_thread(engine):
    llm = AsyncLLM(engine)
    try:
        release = _block_engine_thread(llm)
        # futures cancelled while queued: the old code's set_result raised InvalidStateError, then
        # set_exception raised again and the loop exited
        futs = [llm.call(lambda e: 1), llm.call(lambda e: 1 / 0)]
        assert all(f.cancel() for f in futs)
        release.set()
        assert llm.call(lambda e: "alive").result(timeout=10) == "alive"
        assert llm.is_alive

        async def gen():
            out = None
            async for out in llm.generate(list(range(5, 15)), SamplingParams(max_tokens=4, temperature=0,
                                                                             ignore_eos=True)):
                pass
            return out
        assert asyncio.run(gen()).outputs[0].finish_reason == "length"
    finally:
        llm.shutdown()


def test_request_cancelled_while_queued_leaves_nothing_behind(engine):
    """A stream cancelled before add_request ran: the add still happens, the queued abort frees it."""
    llm = AsyncLLM(engine)
    try:
        release = _block_engine_thread(llm)

        async def cancel_early():
            task = asyncio.ensure_future(_consume(llm.generate(list(range(5, 25)), SamplingParams(max_tokens=64))))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        asyncio.run(cancel_early())
        release.set()
        state = llm.call(lambda e: (e.num_unfinished_requests, e.block_manager.num_free_blocks,
                                    e.block_manager.num_blocks)).result(timeout=10)
        assert state[0] == 0 and state[1] == state[2]
        assert llm.is_alive
    finally:
        llm.shutdown()


async def _consume(stream):
    async for _ in stream:
        pass


def test_failing_command_and_observer_do_not_stop_the_loop(engine):
    llm = AsyncLLM(engine)
    try:
        def boom(_outputs):
            raise RuntimeError("observer bug")
        llm.on_step = boom
        with pytest.raises(ZeroDivisionError):
            llm.call(lambda e: 1 / 0).result(timeout=10)

        async def gen():
            async for out in llm.generate(list(range(5, 15)), SamplingParams(max_tokens=3, ignore_eos=True)):
                last = out
            return last
        assert asyncio.run(gen()).finished
        assert llm.is_alive
    finally:
        llm.shutdown()


def test_engine_death_flips_grpc_health_and_http_health(tiny_llama, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loraserve.inference.server import create_server
    from loraserve.v1 import inference_pb2 as pb
    from loraserve.v1 import inference_pb2_grpc as pb_grpc

    async def scenario():
        cfg = ServeConfig(model=tiny_llama[0], port=0, registry_address=None, adapter_cache_dir=str(tmp_path / "c"),
                          openai_port=0, llm_kwargs=dict(dtype="float32", device="cpu"))
        running = await create_server(cfg, wait_ready=True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
                health = health_pb2_grpc.HealthStub(ch)
                req = health_pb2.HealthCheckRequest(service="loraserve.v1.InferenceService")
                before = (await health.Check(req)).status
                core = running.servicer.core

                def die(_engine):  # something no command should ever do: take the loop down
                    raise SystemExit("simulated engine crash")
                core.async_llm.call(die)
                for _ in range(100):
                    if not core.async_llm.is_alive:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.1)
                after = (await health.Check(req)).status
                stub = pb_grpc.InferenceServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Generate(pb.GenerateRequest(text="x", sampling_params=pb.SamplingParams(
                            max_tokens=2))):
                        pass
                code = err.value.code()
            import urllib.error
            import urllib.request
            try:
                await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{running.openai.port}/health")
                http_status = 200
            except urllib.error.HTTPError as exc:
                http_status = exc.code
            return before, after, code, http_status
        finally:
            await running.stop(grace=1)

    before, after, code, http_status = asyncio.run(scenario())
    assert before == health_pb2.HealthCheckResponse.SERVING
    assert after == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    assert http_status == 503


def test_short_deadlines_and_unloads_over_grpc_leave_the_engine_serving(tiny_llama, tmp_path):
    """The issue's reproduction, at the service: 20 Generate calls with 1-80 ms deadlines while
    3 long streams run, and 20 UnloadAdapter calls with 1-30 ms deadlines. Afterwards the engine
    thread is alive, health is SERVING, nothing is left running or pinned, and it still serves."""
    import random
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loraserve.adapters.testing import make_peft_adapter
    from loraserve.inference.testing import RunningInference
    from loraserve.v1 import inference_pb2 as pb
    from loraserve.v1 import inference_pb2_grpc as pb_grpc

    allowed = tmp_path / "allowed"
    adapter = str(make_peft_adapter(allowed / "a", seed=1, r=4))
    cfg = ServeConfig(model=tiny_llama[0], port=0, registry_address=None, adapter_cache_dir=str(tmp_path / "c"),
                      allowed_lora_dirs=[str(allowed)], llm_kwargs=dict(dtype="float32", device="cpu"))
    rng = random.Random(9)

    def request(max_tokens: int, with_adapter: bool = False) -> pb.GenerateRequest:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[rng.randrange(5, 250) for _ in range(12)]),
                                 sampling_params=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        if with_adapter:
            req.lora_request.CopyFrom(pb.LoraRequest(lora_name="a", lora_int_id=3, lora_path=adapter))
        return req

    with RunningInference(cfg) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        digest = stub.LoadAdapter(pb.LoadAdapterRequest(lora_request=pb.LoraRequest(
            lora_name="a", lora_int_id=3, lora_path=adapter)), timeout=30).adapter.digest
        background = [stub.Generate(request(400, with_adapter=i == 0), timeout=120) for i in range(3)]
        for call in background:
            assert next(call).WhichOneof("response") == "chunk"
        codes = []
        for _ in range(20):
            try:
                for _ in stub.Generate(request(64, with_adapter=rng.random() < 0.5), timeout=rng.uniform(0.001, 0.08)):
                    pass
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        for _ in range(20):
            try:
                stub.UnloadAdapter(pb.UnloadAdapterRequest(digest=digest), timeout=rng.uniform(0.001, 0.03))
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.FAILED_PRECONDITION}, codes  # busy: the background stream pins it
        for call in background:
            call.cancel()
        assert srv.core.async_llm.is_alive
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        deadline = time.time() + 10
        while time.time() < deadline:
            s = stub.GetServerStats(pb.GetServerStatsRequest(), timeout=10)
            if (s.running_requests, s.waiting_requests, s.active_streams, s.device_slots_pinned) == (0, 0, 0, 0):
                break
            time.sleep(0.05)
        assert (s.running_requests, s.waiting_requests, s.active_streams, s.device_slots_pinned) == (0, 0, 0, 0)
        assert s.free_kv_blocks == s.total_kv_blocks
        final = list(stub.Generate(request(4, with_adapter=True), timeout=60))
        assert final[-1].complete.completion_tokens == 4


@pytest.mark.parametrize("key", ["auth_token", "registry_token"])
@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_empty_inference_tokens_are_refused(key, value):
    """Issue 9.5 on the inference side: an empty token must not silently disable auth."""
    with pytest.raises(ValueError, match=key):
        ServeConfig(**{key: value})
