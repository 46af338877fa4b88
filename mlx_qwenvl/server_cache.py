"""The server's conversation cache: an LRU of ``PromptCache``s (KV caches with their M-RoPE
offset), bounded by count and bytes, keyed by prompt keys (token ids in which each image's
placeholder run is its content id, see ``server_requests``).

A request continues the cache sharing its longest prefix: a client that resends the whole
conversation prefills only the new turn, and the images of earlier turns are never encoded
again. The worker fetches and stores; request threads only ``peek`` (to skip the pixel rows of
images the cache holds), under a lock.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from mlx.utils import tree_map

from .model import PromptCache


@dataclass
class Entry:
    key: np.ndarray  # (n,) int64: exactly the tokens the cache holds
    cache: PromptCache
    nbytes: int


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the longest common prefix of two 1-D arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def cache_nbytes(cache) -> int:
    return sum(layer.nbytes for layer in cache)


def copy_prefix(cache: PromptCache, length: int) -> PromptCache:
    """A new cache holding the first ``length`` tokens of ``cache`` (whose own arrays are left
    untouched), with the M-RoPE offset of that prefix.

    The layers' arrays are sliced, which shares their memory until the copy is extended (a KV
    cache writes into its arrays in place, so the copy must not hold the same array objects).

    Raises:
        ValueError: ``length`` ends inside an image's tokens (see ``PromptCache.safe_length``).
    """
    if cache.safe_length(length) != length:
        raise ValueError(f"cannot keep {length} tokens: that ends inside an image or video")
    layers = []
    for layer in cache:
        twin = copy.copy(layer)  # same class and settings (quantization bits, group size)
        twin.keys, twin.values = tree_map(lambda x: x[..., :length, :], (layer.keys, layer.values))
        twin.offset = length
        layers.append(twin)
    out = PromptCache(layers, cache.vision_token_ids)
    out.rope_delta, out.vision_calls = cache.rope_delta, list(cache.vision_calls)
    out.trim(length)  # drops the vision calls after the prefix and restores their offset
    return out


class ConversationCache:
    """At most ``max_entries`` caches and ``max_bytes`` bytes of them, least recently used
    first out; ``max_entries=0`` turns caching off."""

    def __init__(self, max_entries: int = 10, max_bytes: int = 4 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: "OrderedDict[int, Entry]" = OrderedDict()  # oldest first
        self._next_id = 0
        self._lock = threading.RLock()  # nbytes is read inside store, and from /health

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self.entries.values())

    def fetch(self, key: np.ndarray, make_cache: Callable[[], PromptCache]) -> tuple[PromptCache, int]:
        """``(cache, kept)``: a cache holding the first ``kept`` tokens of ``key``, the longest
        cached prefix that leaves at least one token to feed and does not end inside an image.

        A cached entry that is wholly a prefix of ``key`` is taken out and handed over (the
        request extends it and stores it back); a longer one is copied and trimmed, so it stays
        for the conversations it serves.
        """
        with self._lock:
            entry_id, kept = self._kept(key)
            if entry_id is None:
                return make_cache(), 0
            entry = self.entries[entry_id]
            if kept == len(entry.key):
                del self.entries[entry_id]
                return entry.cache, kept
            self.entries.move_to_end(entry_id)
        return copy_prefix(entry.cache, kept), kept

    def peek(self, key: np.ndarray) -> int:
        """How many tokens of ``key`` a ``fetch`` now would keep (any thread)."""
        with self._lock:
            return self._kept(key)[1]

    def _kept(self, key: np.ndarray) -> tuple[Optional[int], int]:
        entry_id, shared = self._nearest(key)
        if entry_id is None:
            return None, 0
        kept = self.entries[entry_id].cache.safe_length(min(shared, len(key) - 1))
        return (entry_id, kept) if kept > 0 else (None, 0)

    def store(self, key: np.ndarray, cache: PromptCache) -> None:
        """Keep ``cache``, which holds exactly the tokens of ``key``; entries whose keys are
        prefixes of ``key`` go (this one serves them by trimming), then the oldest until both
        bounds hold again (this one too, if it alone is over the byte bound)."""
        if self.max_entries <= 0 or len(key) == 0:
            return
        entry = Entry(np.asarray(key, dtype=np.int64).copy(), cache, cache_nbytes(cache))
        with self._lock:
            for entry_id, old in list(self.entries.items()):
                if len(old.key) <= len(key) and common_prefix(old.key, key) == len(old.key):
                    del self.entries[entry_id]
            self._next_id += 1
            self.entries[self._next_id] = entry
            while self.entries and (len(self.entries) > self.max_entries or self.nbytes > self.max_bytes):
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def _nearest(self, key: np.ndarray) -> tuple[Optional[int], int]:
        """The entry sharing the longest prefix with ``key`` (the most recent on ties)."""
        best, best_length = None, 0
        for entry_id, entry in reversed(self.entries.items()):
            length = common_prefix(entry.key, key)
            if length > best_length:
                best, best_length = entry_id, length
        return best, best_length
