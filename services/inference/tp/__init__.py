"""Tensor parallelism over one host's devices (Megatron-style shards, NCCL on CUDA, gloo on CPU).

parallel.py  the rank's group and the collectives the model calls; shard_args
executor.py  the driver (rank 0): starts workers, sends commands, detects a dead worker, stops them
worker.py    a worker process (ranks 1..N-1)
step.py      one step on any rank; how a LoRA adapter is split
runner.py    TPModelRunner: ModelRunner of rank 0 (ModelRunner picks it for a sharded model)
startup.py   per-rank start-up phase times; the decode buckets captured under TP
"""
from __future__ import annotations


def start_tensor_parallel(config, device):
    """None for tensor_parallel_size == 1 (nothing started, nothing imported); else this process's
    TPGroup (rank 0) with its executor, after the N-1 workers joined the process group."""
    size = config.tensor_parallel_size
    if size == 1:
        return None
    import torch

    from ..models.llama import ModelArgs
    from ..models.loader import read_hf_config
    from .executor import TPExecutor
    from .parallel import TensorParallelError, make_group, shard_args
    from .startup import StartupClock

    clock = StartupClock(0)
    args = ModelArgs.from_hf_config(read_hf_config(config.model))
    shard_args(args, size)   # refuse a model that does not split before any process starts
    if device.type == "cuda" and (device.index or 0) + size > torch.cuda.device_count():
        raise TensorParallelError(f"tensor_parallel_size={size} needs {size} GPUs from {device}; "
                                  f"{torch.cuda.device_count()} visible")
    group = make_group(args, 0, size)
    group.executor = TPExecutor(config, device, size)
    group.clock = clock   # TPModelRunner marks the later phases
    clock.mark("spawn + rendezvous")
    try:
        group.setup_all_reduce(device)   # the workers do it right after joining too (worker.py)
    except BaseException:
        group.executor.shutdown()
        raise
    clock.mark("all-reduce set-up")
    return group
