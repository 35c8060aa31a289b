"""Who used the CPU and who held the GIL during a window (issue 12's cold path: the engine process's fetch +
parse took 110 ms where the same code without an engine took 51 ms). Linux only; no py-spy needed.

    with ThreadWatch() as w:
        ...                       # the window (a cold request's download + parse)
    print(w.summary())            # per-thread CPU / run-queue ms, GIL wake lateness and who ran meanwhile

Two views:
  * per OS thread (Python's and native ones: OpenMP, CUDA, grpc), from /proc/self/task/<tid>/schedstat: ns on
    a CPU and ns runnable but waiting for one (the host's CPUs oversubscribed), named by Python's thread name or
    /proc's comm;
  * a sampler thread that sleeps `period_s` and measures how late it wakes: a late wake is the GIL held by
    another thread (or no free CPU: its own run-queue time says which). At each late wake the Python threads
    whose CPU clock advanced meanwhile are charged the lateness at their current frame (file:line function):
    the frames that hold the GIL.
Also every garbage collection in the window (gc.callbacks): its generation and ms (a collection holds the GIL).
The sampler perturbs what it watches (it takes the GIL every period): use it to find the holder, not to time.
"""
from __future__ import annotations

import collections
import gc
import os
import sys
import threading
import time


def _tasks() -> dict[int, tuple[int, int, int]]:
    """tid -> (ns on CPU, ns waiting on a run queue, timeslices) of every thread of this process."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run, wait, slices = (int(x) for x in f.read().split()[:3])
            out[int(tid)] = (run, wait, slices)
        except (OSError, ValueError):
            pass
    return out


def _cpu_ticks() -> list[int]:
    """The host's CPU time so far, all CPUs summed, in clock ticks: user, nice, system, idle, iowait, irq, softirq,
    steal (a VM's CPUs taken by the hypervisor, e.g. for its disk I/O)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return [0] * 8


def _dirty_mb() -> tuple[float, float]:
    """(Dirty, Writeback) MB of the host's page cache: a writeback storm competes for CPU and memory bandwidth."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Dirty", "Writeback"):
                    out[k] = int(v.split()[0]) / 1024
    except (OSError, ValueError):
        pass
    return out.get("Dirty", 0.0), out.get("Writeback", 0.0)


def numa_report(addr: int | None = None) -> str:
    """The host's NUMA nodes (their CPUs) and, for `addr` (e.g. the pinned arena's base), the nodes its mapping's
    pages are on (/proc/self/numa_maps): memory on the far node halves what a recv or a hash can move."""
    parts = []
    try:
        nodes = sorted(n for n in os.listdir("/sys/devices/system/node") if n.startswith("node") and n[4:].isdigit())
        for n in nodes:
            with open(f"/sys/devices/system/node/{n}/cpulist") as f:
                parts.append(f"{n} cpus {f.read().strip()}")
    except OSError:
        parts.append("no /sys NUMA info")
    parts.append(f"this process may run on cpus {sorted(os.sched_getaffinity(0))[:4]}..")
    if addr is not None:
        try:
            starts = []
            with open("/proc/self/maps") as f:
                for line in f:
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    if lo <= addr < hi:
                        starts.append(lo)
            with open("/proc/self/numa_maps") as f:
                for line in f:
                    fields = line.split()
                    if starts and int(fields[0], 16) == starts[0]:
                        parts.append("mapping at %#x: %s" % (starts[0], " ".join(
                            x for x in fields[1:] if x.startswith("N") or x.startswith("bind") or x in ("default",)
                            or x.startswith("interleave") or x.startswith("pages="))))
        except (OSError, ValueError, IndexError):
            parts.append("numa_maps unreadable")
    return "; ".join(parts)


def _comm(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _frame_label(frame) -> str:
    """The innermost frame outside threading/queue/selectors internals (where the thread is in OUR code)."""
    f = frame
    while f is not None and os.path.basename(f.f_code.co_filename) in ("threading.py", "queue.py", "selectors.py",
                                                                          "thread.py", "_base.py"):
        if f.f_back is None:
            break
        f = f.f_back
    f = f or frame
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name}"


class ThreadWatch:
    def __init__(self, period_s: float = 0.001, sample: bool = True):
        self.period_s, self.sample = period_s, sample
        self.late: list[float] = []                       # seconds late per wake
        self.holders: collections.Counter = collections.Counter()  # "thread | frame" -> seconds charged
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.threads: list[tuple[str, float, float, int]] = []  # (name, cpu ms, run-queue ms, slices), busiest first
        self.wall_s = 0.0
        self.collections: list[tuple[int, float, int]] = []  # (generation, ms, objects collected) per gc run
        self._gc_t0 = 0.0

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        else:
            self.collections.append((info.get("generation", -1), (time.perf_counter() - self._gc_t0) * 1e3,
                                     info.get("collected", 0)))

    def _clocks(self) -> dict[int, float]:
        """Python thread ident -> its CPU seconds (pthread CPU clock)."""
        out = {}
        for t in threading.enumerate():
            if t.ident is None or t is self._thread:
                continue
            try:
                out[t.ident] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, AttributeError, ValueError):
                pass
        return out

    def _run(self) -> None:
        names = {}
        prev = self._clocks()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self.period_s)
            late = time.perf_counter() - t0 - self.period_s
            self.late.append(late)
            now = self._clocks()
            if late > 2 * self.period_s:
                frames = sys._current_frames()
                for ident, c in now.items():
                    used = c - prev.get(ident, c)
                    if used > 0.25 * late and ident in frames:
                        if ident not in names:
                            names[ident] = next((t.name for t in threading.enumerate() if t.ident == ident), "?")
                        self.holders[f"{names[ident]} | {_frame_label(frames[ident])}"] += min(used, late)
            prev = now

    def __enter__(self) -> "ThreadWatch":
        self._t0, self._before = time.perf_counter(), _tasks()
        self._cpu0, self.dirty_mb = _cpu_ticks(), _dirty_mb()
        gc.callbacks.append(self._on_gc)
        if self.sample:
            self._thread = threading.Thread(target=self._run, name="thread-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._thread is not None:
            self._thread.join(2)
        after, self.wall_s = _tasks(), time.perf_counter() - self._t0
        tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
        self.host_cpu_ms = [(b - a) * tick_ms for a, b in zip(self._cpu0, _cpu_ticks())]
        py = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        rows = []
        for tid, (run, wait, slices) in after.items():
            r0, w0, s0 = self._before.get(tid, (0, 0, 0))
            if run - r0 > 0 or wait - w0 > 0:
                rows.append((py.get(tid) or f"[{_comm(tid)}]", (run - r0) / 1e6, (wait - w0) / 1e6, slices - s0))
        self.threads = sorted(rows, key=lambda r: -r[1])

    def result(self) -> dict:
        """JSON-able: wall ms, per-thread (name, cpu ms, run-queue ms, slices), GIL lateness, holders (ms)."""
        late = sorted(self.late)
        return {"wall_ms": self.wall_s * 1e3,
                "threads": [(n, round(c, 2), round(w, 2), s) for n, c, w, s in self.threads],
                "wakes": len(late), "late_ms_sum": sum(late) * 1e3,
                "late_ms_p50": late[len(late) // 2] * 1e3 if late else 0.0,
                "late_ms_max": late[-1] * 1e3 if late else 0.0,
                "host_cpu_ms": dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"),
                                        (round(x, 1) for x in self.host_cpu_ms))),
                "dirty_writeback_mb": self.dirty_mb,
                "gc": [(g, round(ms, 2)) for g, ms, _ in self.collections],
                "gc_ms_sum": sum(ms for _, ms, _ in self.collections),
                "holders_ms": {k: round(v * 1e3, 2) for k, v in self.holders.most_common(12)}}

    def summary(self, top: int = 12) -> str:
        r = self.result()
        merged: dict[str, list] = {}
        for n, c, w, s in r["threads"]:  # pool threads of one name summed
            key = n.rsplit("_", 1)[0] if n[:1] != "[" else n
            m = merged.setdefault(key, [0.0, 0.0, 0, 0])
            m[0], m[1], m[2], m[3] = m[0] + c, m[1] + w, m[2] + s, m[3] + 1
        rows = sorted(merged.items(), key=lambda kv: -kv[1][0])[:top]
        host = r["host_cpu_ms"]
        lines = [f"host CPUs (all, ms): " + ", ".join(f"{k} {v:.0f}" for k, v in host.items() if v) + f"; dirty/writeback "
                 f"MB {r['dirty_writeback_mb'][0]:.0f}/{r['dirty_writeback_mb'][1]:.0f}",
                 f"window {r['wall_ms']:.1f} ms; threads (cpu ms / run-queue ms / slices x count): " + ", ".join(
            f"{k} {c:.1f}/{w:.1f}/{s}x{n}" for k, (c, w, s, n) in rows)]
        by_gen = collections.defaultdict(list)
        for g, ms, _ in self.collections:
            by_gen[g].append(ms)
        lines.append(f"gc: {len(self.collections)} collections, {r['gc_ms_sum']:.1f} ms (" + ", ".join(
            f"gen{g}: {len(v)}x, max {max(v):.1f} ms" for g, v in sorted(by_gen.items())) + f"); tracked now "
            f"{len(gc.get_objects())}, frozen {gc.get_freeze_count()}, thresholds {gc.get_threshold()}")
        if self.sample:
            lines.append(f"GIL wakes {r['wakes']}, late sum {r['late_ms_sum']:.1f} ms, p50 {r['late_ms_p50']:.2f}, max "
                         f"{r['late_ms_max']:.2f}; ran while late (ms): " + "; ".join(
                             f"{k} {v:.1f}" for k, v in r["holders_ms"].items()))
        return "\n".join(lines)
