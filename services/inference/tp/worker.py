"""A tensor-parallel worker process (ranks 1..N-1): its shard of the model, KV cache and LoRA slots,
and a loop that runs whatever the driver (rank 0) sends. It samples nothing: its logits shard goes
to the all-gather that rank 0 samples from."""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("loraserve.inference.tp.worker")


def _exit_with_parent(ppid: int) -> None:
    """The pipe's EOF ends an idle worker; this ends one stuck in a collective when the driver is gone."""
    def watch():
        while True:
            if os.getppid() != ppid:
                os._exit(3)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, name="loraserve-tp-parent", daemon=True).start()


def worker_main(rank: int, size: int, init_method: str, config, device: str, conn, backend: str,
                timeout_s: float) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{rank} %(levelname)s %(name)s: %(message)s")
    dump_stacks_when_stuck(f"rank{rank}")
    _exit_with_parent(os.getppid())
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", (dev.index or 0) + rank)
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    try:
        from .executor import device_id
        from .startup import StartupClock

        clock = StartupClock(rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout_s), **device_id(dev))
        clock.mark("rendezvous")
        worker = Worker(config, dev, rank, size, clock)
        worker.loop(conn)
    except EOFError:
        pass   # the driver closed the pipe: it is shutting down or gone
    except BaseException:
        log.exception("tensor-parallel worker %d failed", rank)
        os._exit(1)   # no clean-up that could wait on a peer
    finally:
        conn.close()
    os._exit(0)       # skip interpreter teardown (a destroyed group's threads may still wait on peers)


def dump_stacks_when_stuck(role: str = "main") -> None:
    """LORASERVE_DEBUG_STACKS_S=N: every N seconds, this process's Python stacks to stderr (where
    a rank waits when a collective never pairs up; NCCL hangs instead of failing), or with
    LORASERVE_DEBUG_STACKS_DIR into DIR/stacks_<role>_<pid>.txt (one file per process, each dump appended)."""
    every = float(os.environ.get("LORASERVE_DEBUG_STACKS_S", "0") or 0)
    if every > 0:
        import faulthandler
        import sys

        folder = os.environ.get("LORASERVE_DEBUG_STACKS_DIR", "").strip()
        out = sys.stderr
        if folder:
            os.makedirs(folder, exist_ok=True)
            out = open(os.path.join(folder, f"stacks_{role}_{os.getpid()}.txt"), "a")   # open for the process's life
        faulthandler.dump_traceback_later(every, repeat=True, file=out)


class Worker:
    def __init__(self, config, device: torch.device, rank: int, size: int, clock=None):
        from ..models.loader import load_model, read_hf_config
        from ..models.llama import ModelArgs
        from .parallel import make_group
        from .startup import StartupClock

        self.clock = clock or StartupClock(rank)
        torch.manual_seed(config.seed)
        args = ModelArgs.from_hf_config(read_hf_config(config.model))
        self.group = make_group(args, rank, size)
        self.group.setup_all_reduce(device)   # collective, as rank 0 does after joining (tp/__init__.py)
        self.clock.mark("all-reduce set-up")
        self.model, self.args, self.dtype = load_model(config.model, config.dtype, device, tp=self.group,
                                                       quant_config=config.quant_config)
        self.clock.mark("model load")
        from .fused_norm import attach_norms

        attach_norms(self.model, self.group)   # as rank 0 does (runner.py)
        # as the driver's engine: the RoPE table covers every position served (sliding-window caps only lower it)
        self.model.rotary.num_positions = max(self.model.rotary.num_positions, config.max_seq_len or 0)
        self.local = self.model.args
        self.device, self.rank = device, rank
        self.config = config
        self.slots = self.meta_builder = None
        self.runner = self.graph_runner = None
        from .profile import StepProfiler

        self.profiler = StepProfiler(rank, device)   # LORASERVE_TP_PROFILE (off: no-ops)

    def _setup(self, num_blocks: int, num_slots: int) -> None:
        """The driver's sizes: the same KV blocks and LoRA slots on every rank."""
        from ..model_runner import ModelRunner

        self.clock.mark("waiting for the driver's set-up")
        cfg = dataclasses.replace(self.config, num_kv_blocks=num_blocks, enforce_eager=True, lora_config=None)
        self.runner = ModelRunner(cfg, self.model, self.local, self.dtype, self.device)   # KV cache of its heads
        if self.config.lora_config is not None and num_slots:
            from loraserve.kernels import LoRAMetaBuilder

            from ..lora.slots import DeviceSlots

            lc = self.config.lora_config
            enabled = lc.hf_target_modules() or set(self.local.lora_module_shapes())
            self.slots = DeviceSlots(self.local, enabled, num_slots, lc.max_lora_rank, self.dtype, self.device)
            self.meta_builder_cls = LoRAMetaBuilder
        self.clock.mark("KV cache + runner")

    def _capture(self, max_batch: int, max_blocks: int) -> None:
        """The driver's decode buckets, captured in the same order (runner.py _capture_tp_graphs)."""
        from types import SimpleNamespace

        from ..cuda_graphs import CudaGraphRunner

        lora = None if self.slots is None else SimpleNamespace(num_slots=self.slots.num_slots, slots=self.slots)
        from .startup import graph_buckets

        self.graph_runner = CudaGraphRunner(self.model, self.device, max_batch, max_blocks, self.runner.num_blocks,
                                            self.runner.block_size, lora)
        self.graph_runner.buckets = graph_buckets(self.graph_runner.buckets)   # as rank 0 (runner.py)
        self.graph_runner.capture()
        self.clock.mark(f"decode graphs {self.graph_runner.buckets}")

    @torch.inference_mode()
    def loop(self, conn) -> None:
        from .step import load_slot, unpack_adapter

        prof = self.profiler
        while True:
            prof.waiting()
            msg = conn.recv()
            kind = msg[0]
            if kind == "stop":
                return
            if kind == "setup":
                self._setup(*msg[1:])
            elif kind == "capture":
                self._capture(*msg[1:])
            elif kind == "capture_logits":
                self._capture_logits(*msg[1:])
            elif kind == "profile":
                prof.arm(*msg[1:])
            elif kind == "replay":
                time_replays(self.graph_runner, *msg[1:])
            elif kind == "step":
                prof.begin()
                self._step(msg)
                prof.end()
            elif kind == "load":
                _, slot, index, numel, adapter_rank, module_names, magnitudes = msg
                flat = torch.empty(numel, dtype=self.dtype, device=self.device)
                dist.broadcast(flat, 0)
                if self.slots.copy_stream is not None:   # the slot copies (side stream) read what the broadcast wrote
                    self.slots.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
                    flat.record_stream(self.slots.copy_stream)   # not reused before those copies ran
                load_slot(self.slots, slot, unpack_adapter(index, flat, module_names), adapter_rank, self.local,
                          self.rank, self.model, magnitudes)
            else:
                raise RuntimeError(f"unknown tensor-parallel command {kind!r}")

    def _step(self, msg: tuple) -> None:
        from ..lora.batch import LoRABatch
        from .step import forward, unpack_step

        _, N, B, W, S, has_lora, query_lens, context_lens, graphed = msg[:9]
        logits_graph = len(msg) > 9 and msg[9]   # the driver replays its LM-head + sampler graph (runner.py)
        flat = torch.empty(3 * N + 2 * B + B * W + S, dtype=torch.int64, device=self.device)
        ar = self.group.custom_ar   # the same choice as the driver's (executor.broadcast): by size
        if ar is None or not ar.broadcast_step(flat):
            dist.broadcast(flat, 0)
        inp = unpack_step(flat, N, B, W, S)
        lora = None
        if graphed:
            inp.has_lora = has_lora
            hidden = self.graph_runner.run(inp)
            if logits_graph:   # the variant the driver replays (has_lora: over the LoRA decode graph's output)
                graphs = self.lora_logits_graphs if has_lora else self.logits_graphs
                graphs[next(b for b in self.graph_runner.buckets if b >= N)].replay()
            elif S:
                self.model.compute_logits(hidden[inp.sample_idx])
            return
        if has_lora:
            reps = torch.tensor(query_lens, dtype=torch.int64).to(self.device, non_blocking=True)
            token_slot = torch.repeat_interleave(inp.token_slot, reps, output_size=N).int()
            if self.meta_builder is None or self.meta_builder.max_tokens < N:
                self.meta_builder = self.meta_builder_cls(max(N, 256), self.slots.num_slots, self.device)
            lora = LoRABatch(self.slots, self.meta_builder.build(token_slot))
            if self.device.type == "cuda":
                self.slots.wait_for_copies()
        hidden = forward(self.model, inp, query_lens, context_lens, lora, self.device)
        if S:
            self.model.compute_logits(hidden[inp.sample_idx])   # this rank's part of the all-gather

    def _capture_logits(self, local_argmax: bool = False) -> None:
        """Per decode bucket, the LM head's shard and its logits gather over the bucket graph's hidden
        states, captured in the driver's order (CudaGraphRunner.capture_greedy_sampler on rank 0: one warm-up
        gather, then the capture, per bucket, largest first); local_argmax: this rank's part of the
        sharded greedy sampling instead (tp/sampling.py, as rank 0)."""
        from .sampling import capture_sampler_graphs, self_check

        if local_argmax and self_check(self.model, self.group, self.device):   # as rank 0 (runner.py)
            graphs = capture_sampler_graphs(self.graph_runner, self.model, self.group, self.device)
            self.logits_graphs = {bs: g for bs, (g, _, _) in graphs.items()}
            if any(lora for _, lora in self.graph_runner.graphs):   # as rank 0: the LoRA decode graphs' variant
                graphs = capture_sampler_graphs(self.graph_runner, self.model, self.group, self.device, True)
                self.lora_logits_graphs = {bs: g for bs, (g, _, _) in graphs.items()}
            self.clock.mark("sampler graphs (sharded greedy)")
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        pool = torch.cuda.graph_pool_handle()
        self.logits_graphs = {}
        for bs in reversed(self.graph_runner.buckets):
            hidden = self.graph_runner.graphs[(bs, False)][1]
            with torch.cuda.stream(stream):
                self.model.compute_logits(hidden)   # warm-up (its gather pairs with the driver's)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.model.compute_logits(hidden)
            self.logits_graphs[bs] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.clock.mark("sampler graphs (logits gather)")


def time_replays(graph_runner, bs: int, n: int, with_lora: bool = False) -> float:
    """ms per replay of the decode graph of bucket `bs`, `n` back to back (every rank at once: the
    all-reduces inside pair up). The device time of a step's layers with no host in the way. Only while
    the engine is idle: the replays write KV rows of the last step's slots (freed blocks once its
    requests are gone) and the scratch block."""
    graph = graph_runner.graphs[(bs, with_lora)][0]
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n
