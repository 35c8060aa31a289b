"""Paged KV-cache bookkeeping: free blocks, each sequence's block table, and block reuse.

Block reuse (prefix caching, TensorRT-LLM's `enable_block_reuse`): a full block is keyed by
a hash chained over every token before it *and the adapter's content digest*, so requests
share K/V only when the same adapter produced it (the same prompt under two adapters, or
under re-registered weights, never shares). A freed block keeps its key until it is handed
out again, least recently freed first, so a popular prefix survives its request.
"""
from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_reuse: bool = True):
        self.num_blocks, self.block_size, self.enable_reuse = num_blocks, block_size, enable_reuse
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.ref_count = [0] * num_blocks
        self.block_key: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.key_to_block: dict[int, int] = {}
        self.num_reused_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs to hold `num_tokens` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free_blocks)

    def _take(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        key = self.block_key[block]
        if key is not None:  # its cached contents are about to be overwritten
            if self.key_to_block.get(key) == block:
                del self.key_to_block[key]
            self.block_key[block] = self.block_tokens[block] = None
        self.ref_count[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take())

    def deallocate(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.prefix_key = None

    def _key(self, prev: int | None, tokens: tuple[int, ...], adapter: str | None) -> int:
        return hash((prev, tokens, adapter))

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its longest cached prefix
        (always leaving one token to compute); returns the number of tokens reused."""
        assert not seq.block_table
        if not self.enable_reuse:
            return 0
        bs, key = self.block_size, None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            key = self._key(key, tokens, seq.adapter_key)
            block = self.key_to_block.get(key)
            if block is None or self.block_tokens[block] != tokens:
                break
            if self.ref_count[block] == 0:
                del self.free_blocks[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.prefix_key = key
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * bs
        self.num_reused_blocks += len(seq.block_table)
        return seq.num_computed_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Key the blocks that the last step filled, so that later requests can reuse them."""
        if not self.enable_reuse:
            return
        bs = self.block_size
        while (seq.num_hashed_blocks + 1) * bs <= seq.num_computed_tokens:
            i = seq.num_hashed_blocks
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            key = self._key(seq.prefix_key, tokens, seq.adapter_key)
            block = seq.block_table[i]
            if key not in self.key_to_block and self.block_key[block] is None:
                self.key_to_block[key] = block
                self.block_key[block], self.block_tokens[block] = key, tokens
            seq.prefix_key = key
            seq.num_hashed_blocks += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block's key (vLLM's reset_prefix_cache): later requests compute their whole
        prompt. Only while no block is in use (False, and nothing changes, otherwise)."""
        if len(self.free_blocks) != self.num_blocks:
            return False
        self.key_to_block.clear()
        self.block_key = [None] * self.num_blocks
        self.block_tokens = [None] * self.num_blocks
        return True
