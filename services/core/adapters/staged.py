"""StagedArtifact: a whole artifact in one writable buffer (a ranged download's staging block), handed
to one parser, possibly while its bytes still arrive (the parser waits for the bytes it reads).
Used by archives._read_plain_tar_bytes, the parsers (STAGED_IN_PROGRESS) and AdapterFetcher."""
from __future__ import annotations

import bisect
import contextvars
import io
import os
import threading
from collections.abc import Callable

import torch


# the StagedArtifact being parsed in this thread while its bytes still arrive (load_adapter sets it):
# code that reads tensor values waits for them through it (None: every byte is there)
STAGED_IN_PROGRESS: contextvars.ContextVar["StagedArtifact | None"] = contextvars.ContextVar(
    "loraserve_staged_in_progress", default=None)


# the parser's scale folds of B run as the bytes land, on the download's threads (StagedArtifact.fold_on_landing);
# LORASERVE_FOLD_ON_LANDING=0: on the parser's thread after each B's bytes arrived (as before)
FOLD_ON_LANDING = os.environ.get("LORASERVE_FOLD_ON_LANDING", "1") != "0"


class StagedArtifact:
    """A whole artifact in one contiguous, writable uint8 CPU tensor `buf` (a ranged download copied
    each message straight to its offset, into a pinned arena block on CUDA) that its holder hands to
    ONE parser: a plain tar's weights files become views of `buf` (no copy; the parser folds scales
    into them in place). `block`: the arena block to give back when the weights are dropped (None:
    plain memory); `release()` gives it back (the artifact was not kept).

    The bytes may still be arriving (`in_progress()`, AdapterFetcher with LORASERVE_FETCH_OVERLAP):
    the download reports each piece that landed (`landed`) and then its end (`finish`, with the
    error if it failed or did not verify); readers wait for the bytes they touch (`wait_for`), and
    nothing parsed from it may be used before `wait_verified()` returned. Thread-safe."""

    def __init__(self, buf: torch.Tensor, block: torch.Tensor | None = None,
                 on_release: Callable[[torch.Tensor], None] | None = None, in_progress: bool = False):
        assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.device.type == "cpu"
        self.buf, self.block, self._on_release = buf, block, on_release
        self.consumed = False  # a parser took it (its views now own `block`)
        self._cond = threading.Condition()
        self._done = not in_progress          # no more writes into buf (the download ended, either way)
        self._error: BaseException | None = None
        self._spans: list[list[int]] = [] if in_progress else [[0, buf.numel()]]  # landed [start, end), merged
        self.download_s = 0.0                 # set by the downloader at finish (overlapped with the parse)
        self.released = threading.Event()     # set by release(): the parser is done with it (or nobody parses it)
        # fold_on_landing: [start, end, b, scale] not folded yet (sorted by start), folds running or done
        self._folds: list[list] = []
        self._folds_running = 0
        self._fold_error: BaseException | None = None

    def __len__(self) -> int:
        return self.buf.numel()

    def view(self) -> memoryview:
        return memoryview(self.buf.numpy())

    def take(self) -> memoryview:
        """The bytes, for the one parser that may write them; a second take is a bug."""
        if self.consumed:
            raise RuntimeError("a staged artifact's bytes were already handed to a parser")
        self.consumed = True
        return self.view()

    # ---- the download's side --------------------------------------------------------------------
    def begin(self) -> None:
        """The bytes start arriving now (before the artifact is handed to anyone)."""
        with self._cond:
            self._done, self._error, self._spans = False, None, []

    def in_progress(self) -> bool:
        with self._cond:
            return not self._done

    def landed(self, start: int, end: int) -> None:
        """Bytes [start, end) of buf hold their final value. Folds registered by fold_on_landing whose bytes are
        now all there run here, on the reporting (download) thread."""
        with self._cond:
            i = bisect.bisect_left(self._spans, [start, end])
            self._spans.insert(i, [start, end])
            merged: list[list[int]] = []
            for span in self._spans:
                if merged and span[0] <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], span[1])
                else:
                    merged.append(span)
            self._spans = merged
            ready = self._take_ready_folds()
            self._cond.notify_all()
        self._run_folds(ready)

    # ---- scale folds as the bytes land (the parser's B * scale, off the parser's thread) ------------------
    def fold_on_landing(self, items: list) -> None:
        """items: [(b, scale)]: contiguous views of buf to multiply by scale in place once their bytes landed,
        each exactly once, bit for bit b.mul_(scale). They run on the download's threads as it reports the bytes
        (an 84 MB adapter's 224 folds, ~10 ms on one thread, spread over the download instead of the parser's
        tail after the last byte); wait_folds() waits for the rest (and runs any the download left)."""
        base = self.buf.data_ptr()
        with self._cond:
            for b, scale in items:
                start = b.data_ptr() - base
                self._folds.append([start, start + b.numel() * b.element_size(), b, scale])
            self._folds.sort(key=lambda f: f[0])
            ready = self._take_ready_folds()
        self._run_folds(ready)

    def wait_folds(self) -> None:
        """Until every fold registered is done; folds whose bytes are there run on this thread; raises the
        download's error if it failed before their bytes arrived."""
        while True:
            with self._cond:
                if self._fold_error is not None:
                    raise self._fold_error
                ready = self._take_ready_folds()
                if not ready:
                    if not self._folds and not self._folds_running:
                        return
                    if self._done and self._folds and not self._folds_running:
                        raise self._error or RuntimeError("the download ended without the bytes of a fold")
                    self._cond.wait()
                    continue
            self._run_folds(ready)

    def _take_ready_folds(self) -> list:
        """(under the lock) The registered folds whose bytes all landed, taken off the list."""
        if not self._folds:
            return []
        ready, keep = [], []
        for f in self._folds:
            i = bisect.bisect_right(self._spans, [f[0], float("inf")]) - 1
            (ready if i >= 0 and self._spans[i][0] <= f[0] and self._spans[i][1] >= f[1] else keep).append(f)
        if ready:
            self._folds = keep
            self._folds_running += 1
        return ready

    def _run_folds(self, ready: list) -> None:
        if not ready:
            return
        from .threads import one_cpu_thread

        err = None
        try:
            with one_cpu_thread():  # (each mul_ on this thread alone: no OpenMP workers on a download thread)
                for _, _, b, scale in ready:
                    b.mul_(scale)
        except BaseException as exc:  # noqa: BLE001 - the parser's wait_folds raises it
            err = exc
        with self._cond:
            self._folds_running -= 1
            if err is not None and self._fold_error is None:
                self._fold_error = err
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        """The download ended: verified (error None: every byte landed), or failed with `error`."""
        with self._cond:
            self._done, self._error = True, error
            if error is None:
                self._spans = [[0, self.buf.numel()]]
            self._cond.notify_all()

    # ---- the reader's side --------------------------------------------------------------------
    def wait_for(self, start: int, end: int) -> None:
        """Until bytes [start, end) landed; raises the download's error if it failed first."""
        end = min(end, self.buf.numel())
        with self._cond:
            while True:
                i = bisect.bisect_right(self._spans, [start, float("inf")]) - 1
                if end <= start or (i >= 0 and self._spans[i][0] <= start and self._spans[i][1] >= end):
                    return
                if self._done:
                    raise self._error or RuntimeError("the download ended without these bytes")
                self._cond.wait()

    def wait_tensor(self, t: torch.Tensor) -> None:
        """Until a view of buf has landed (whatever the other bytes)."""
        start = t.data_ptr() - self.buf.data_ptr()
        self.wait_for(start, start + t.numel() * t.element_size())

    def wait_all(self) -> None:
        self.wait_for(0, self.buf.numel())

    def wait_done(self) -> None:
        """Until no more bytes will be written into buf (so its memory may be reused)."""
        with self._cond:
            while not self._done:
                self._cond.wait()

    def wait_verified(self) -> None:
        """Until the download verified (its digest checked out); raises its error otherwise."""
        self.wait_done()
        if self._error is not None:
            raise self._error

    def release(self) -> None:
        """Give the block back unless its owner took it over (set `block` to None: a kept adapter's
        weights are views of it); waits until the download stopped writing into it."""
        block, self.block = self.block, None
        self.consumed = True
        try:
            if block is not None and self._on_release is not None:
                self.wait_done()
                self._on_release(block)
        finally:
            self.released.set()


class _WaitingFile(io.RawIOBase):
    """_ChunkFile over a StagedArtifact whose bytes may still be arriving: each read waits for them."""

    def __init__(self, staged: StagedArtifact, whole: memoryview):
        self.staged, self.whole, self.pos = staged, whole, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        dst = memoryview(b).cast("B")
        n = max(0, min(len(dst), len(self.whole) - self.pos))
        self.staged.wait_for(self.pos, self.pos + n)
        dst[:n] = self.whole[self.pos:self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset if whence == 0 else self.pos + offset if whence == 1 else len(self.whole) + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos
