"""GPU-slot admission for the LoRAManager: which waiting request gets an adapter slot, and when.

The scheduler's one interface is `try_acquire(seq)` (pin seq's adapter on a slot, or say "not
yet" while it holds nothing); `release_slot(seq)` undoes it. The fairness policy (slot hand-off
by default, bounded bypass with LORASERVE_SLOT_HANDOFF=0) lives here, apart from the tiers and
the loading in manager.py. A mixin: the state it reads (lock, tiers, the blocked maps) is the
manager's, set up in LoRAManager.__init__.
"""
from __future__ import annotations

import time

from ..errors import AdapterLoadError
from ..sequence import Sequence
from .holds import AdapterHandle


class SlotAdmission:
    # ---- the scheduler's interface (engine thread) ----------------------------------------------
    def try_acquire(self, seq: Sequence) -> bool:
        """Pin seq's adapter on a GPU slot; False: not yet (it stays queued, holding nothing).

        Fairness, slot hand-off by default: see _acquire_by_handoff. With LORASERVE_SLOT_HANDOFF=0
        (bounded bypass): while an older request waits for a slot, a newer request may go
        ahead of it only if its adapter is already on a slot, and only `max_slot_bypass` times;
        after that nothing new is admitted with an adapter until the oldest got its slot, so the
        slots drain to it within the time the running sequences need to finish (each bounded by
        its max_tokens). Raises AdapterLoadError if the adapter cannot be loaded."""
        with self.lock:
            h: AdapterHandle = seq.lora.handle
            if h.load_error is not None and seq.arrival_time <= h.load_error_time:
                raise AdapterLoadError(f"adapter {h.name!r} could not be loaded: {h.load_error}")
            if self.slot_handoff:
                return self._acquire_by_handoff(seq, h)
            oldest = min(self._blocked.items(), key=lambda kv: kv[1], default=None)
            if oldest is not None and oldest[0] != seq.seq_id and oldest[1] < seq.arrival_time:
                if h.slot is None or self._bypasses.get(oldest[0], 0) >= self.max_slot_bypass:
                    if h.adapter is None and h.slot is None:
                        self._start_load(h)  # its turn comes later; have the host copy ready by then
                    return False
                self._bypasses[oldest[0]] = self._bypasses.get(oldest[0], 0) + 1
            if h.slot is not None and h.slot_pins == 0 and self._batch_full():
                self._blocked.setdefault(seq.seq_id, seq.arrival_time)
                return False
            if h.slot is not None:
                self.device_tier.stats.hits += 1
                return self._pin(h, seq)
            if h.adapter is None:
                self._start_load(h)  # waits for the host copy; not counted as slot-blocked
                return False
            t0 = time.perf_counter()
            if self._batch_full() or not self.device_tier.place(h):
                self._blocked.setdefault(seq.seq_id, seq.arrival_time)
                return False
            h.timings["place_s"] = time.perf_counter() - t0  # host work issuing the copy (async on CUDA)
            return self._pin(h, seq)

    def _acquire_by_handoff(self, seq: Sequence, h: AdapterHandle) -> bool:
        """Slot hand-off (the default; LORASERVE_SLOT_HANDOFF=0: the bounded-bypass policy below). Requests whose adapter is on a slot
        are admitted freely (they take no slot); requests that need a slot (or a batch position,
        max_loras) get one in arrival order. When the oldest of them finds every slot pinned, ONE
        slot is chosen to drain to it (an adapter with no queued work first, then the fewest
        running sequences, then least recently used): no new request joins that slot, and when its
        running sequences finish it goes to the oldest waiter. So the oldest waits only for one
        slot's running sequences (each bounded by its max_tokens), and every other slot keeps
        admitting meanwhile (the previous policy stopped all admissions after max_slot_bypass)."""
        if not self._blocked:
            self._draining = None
        elif self._draining is not None:
            # the oldest waiter wants the draining adapter itself (it was placed meanwhile): nothing to hand off
            oldest_id = min(self._blocked.items(), key=lambda kv: kv[1])[0]
            if self._blocked_on.get(oldest_id) is self._draining:
                self._draining = None
        if h.slot is not None and h is self._draining:
            return False  # its slot goes to the oldest waiter; this request queues for a slot later
        if h.slot is not None and (h.slot_pins or not self._batch_full()):
            self.device_tier.stats.hits += 1
            return self._pin(h, seq)
        if h.adapter is None and h.slot is None:
            self._start_load(h)  # waits for the host copy; not counted as slot-blocked
            return False
        self._blocked.setdefault(seq.seq_id, seq.arrival_time)
        self._blocked_on[seq.seq_id] = h
        oldest = min(self._blocked.items(), key=lambda kv: kv[1])
        if oldest[0] != seq.seq_id and oldest[1] < seq.arrival_time:
            return False  # slots go to the waiters in arrival order
        t0, placing = time.perf_counter(), h.slot is None
        if not self._batch_full() and (not placing or self.device_tier.place(h)):
            if placing:
                h.timings["place_s"] = time.perf_counter() - t0  # host work issuing the copy (async on CUDA)
            self._draining = None  # the oldest got its place; the next waiter picks its own victim
            return self._pin(h, seq)
        # a new victim when the last one left its slot, or drained without making room (rank packing:
        # the oldest's aligned block may hold another pinned adapter; unpacked, a drained slot always fits)
        if self._draining is None or self._draining.slot is None or self._draining.slot_pins == 0:
            self._draining = self._pick_drain_victim()
            self.num_handoffs += self._draining is not None
        return False

    def _pick_drain_victim(self) -> AdapterHandle | None:
        order = {s: i for i, s in enumerate(self.device_tier.lru)}
        pinned = [o for o in self.device_tier.owner if o is not None and o.slot_pins > 0]
        return min(pinned, key=lambda o: (o.num_requests > o.slot_pins, o.slot_pins, order.get(o.slot, -1)),
                   default=None)

    def _batch_full(self) -> bool:
        """max_loras distinct adapters are already in use by running sequences."""
        cap = self.lora_config.max_loras
        return cap is not None and self.device_tier.num_pinned >= cap

    def _pin(self, h: AdapterHandle, seq: Sequence) -> bool:
        self._blocked.pop(seq.seq_id, None)
        self._blocked_on.pop(seq.seq_id, None)
        self._bypasses.pop(seq.seq_id, None)
        self.device_tier.pin(h)
        self.host.touch(h)
        return True

    def release_slot(self, seq: Sequence) -> None:
        with self.lock:
            self.device_tier.unpin(seq.lora.handle)
