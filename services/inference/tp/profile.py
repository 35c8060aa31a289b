"""Where a tensor-parallel step's time goes, per rank (diagnostics; nothing here runs unless asked).

LORASERVE_TP_PROFILE=DIR[:FIRST[:COUNT]][,FIRST:COUNT...]: every rank (the driver's shard 0 and each worker)
profiles its steps FIRST..FIRST+COUNT-1 (each window) with torch.profiler and writes DIR/tp_rank{r}_step{FIRST}.txt;
with DIR alone, the windows the driver arms (TPModelRunner.profile_steps: DIR/tp_rank{r}_{tag}.txt):
  * host: per step, the time the rank waited for its next command (workers: blocked in the pipe's recv)
    and the time it spent launching the step (Python + launches), mean over the window;
  * device: the window's wall span on the GPU, the union of kernel time (busy) and the gaps, the kernels
    grouped by name (count, total, mean), so the all-reduce kernels' mean can be read against their
    isolated latency (benchmarks/bench_allreduce.py): a mean far above it is time spent waiting for the
    peer rank (skew between ranks), not moving bytes.
The window should hold decode steps only (the benchmark's timed loop), so every line is one step shape.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict

import torch


class StepProfiler:
    def __init__(self, rank: int, device: torch.device):
        spec = os.environ.get("LORASERVE_TP_PROFILE", "").strip()
        self.rank, self.device = rank, device
        self.dir = spec.split(",")[0].split(":")[0] or None
        head, *more = spec.split(",")
        parts = head.split(":")
        self.windows = []   # (first step, count) still to come
        if len(parts) > 1:
            self.windows = [(int(parts[1]) if parts[1] else 40, int(parts[2]) if len(parts) > 2 and parts[2] else 8)]
            self.windows += [tuple(int(v) for v in w.split(":")) for w in more]
        self.on = bool(self.windows)
        self.first, self.count = self.windows.pop(0) if self.windows else (0, 0)
        self.tag = None
        self.step = 0
        self.prof = None
        self.wait_s = self.launch_s = 0.0
        self._t_wait = self._t_launch = None

    def arm(self, skip: int, count: int, tag: str | None = None) -> None:
        """Profile `count` steps after the next `skip` ones (every rank is armed between the same two steps:
        runner.py sends the command). Nothing without LORASERVE_TP_PROFILE=DIR."""
        if self.dir:
            self.first, self.count, self.tag, self.on = self.step + skip + 1, count, tag, True

    def waiting(self) -> None:
        """Before blocking on the next command (workers) or before building the step (driver)."""
        if self.on:
            self._t_wait = time.perf_counter()

    def begin(self) -> None:
        """A step's command has arrived: its launch starts."""
        if not self.on:
            return
        self.step += 1
        now = time.perf_counter()
        if self.step == self.first:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.wait_s = self.launch_s = 0.0
        elif self.prof is not None and self._t_wait is not None:
            self.wait_s += now - self._t_wait
        self._t_launch = time.perf_counter()

    def end(self) -> None:
        """The step is launched (its kernels queued)."""
        if not self.on or self.prof is None:
            return
        self.launch_s += time.perf_counter() - self._t_launch
        if self.step == self.first + self.count - 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.prof.__exit__(None, None, None)
            try:
                self._write()
            finally:
                self.prof = None
                if self.windows:
                    self.first, self.count = self.windows.pop(0)
                else:
                    self.on = False

    def _write(self) -> None:
        n = self.count
        kernels = []   # (start_us, end_us, name)
        for e in self.prof.events():
            if getattr(getattr(e, "device_type", None), "name", "") != "CUDA":
                continue
            tr = e.time_range
            kernels.append((tr.start, tr.end, e.name))
        lines = [f"rank {self.rank}: {n} steps (steps {self.first}..{self.first + n - 1})",
                 f"host: waiting for the command {1e3 * self.wait_s / max(n - 1, 1):.3f} ms/step, "
                 f"launching {1e3 * self.launch_s / n:.3f} ms/step"]
        if kernels:
            kernels.sort()
            span = kernels[-1][1] - kernels[0][0]
            busy, cur_s, cur_e = 0.0, kernels[0][0], kernels[0][1]
            for s, e, _ in kernels[1:]:
                if s > cur_e:
                    busy += cur_e - cur_s
                    cur_s, cur_e = s, e
                else:
                    cur_e = max(cur_e, e)
            busy += cur_e - cur_s
            lines.append(f"device: span {span / 1e3 / n:.3f} ms/step, kernels busy {busy / 1e3 / n:.3f} ms/step, "
                         f"gaps {(span - busy) / 1e3 / n:.3f} ms/step, {len(kernels) / n:.1f} kernels/step")
            groups: dict[str, list[float]] = defaultdict(list)
            for s, e, name in kernels:
                groups[name[:90]].append(e - s)
            lines.append(f"{'us/step':>9} {'count/step':>10} {'mean us':>8}  kernel")
            for name, ds in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:30]:
                lines.append(f"{sum(ds) / n:9.1f} {len(ds) / n:10.1f} {sum(ds) / len(ds):8.2f}  {name}")
        os.makedirs(self.dir, exist_ok=True)
        text = "\n".join(lines) + "\n"
        name = f"tp_rank{self.rank}_{self.tag}.txt" if self.tag else f"tp_rank{self.rank}_step{self.first}.txt"
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(text)
