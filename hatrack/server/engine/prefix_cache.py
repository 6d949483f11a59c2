"""Reuse of prompt-prefix KV across requests of one adapter (a tenant's long system
prompt, prefilled once).

Prompts are prefilled in chunks of PREFILL_CHUNK positions whose boundaries depend on
the prompt alone, and a prefix is kept only up to a chunk boundary. So a request that
reuses a cached prefix computes the rest exactly as it would have without the cache:
the answer does not depend on whether the prefix was cached.

Entries are keyed by the adapter's key (its content: label and sha256) and the
prefix's tokens, so an adapter's cached prefix never answers for another adapter or for
the base. A prefix is stored the second time it is seen (one-off prompts cost nothing),
under a byte budget, least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from hatrack.server.engine.kv_cache import KVCache

PREFILL_CHUNK = 128  # prompt positions per prefill segment; also the prefix cache's grain
_SEEN_LIMIT = 4096  # prefix fingerprints remembered while waiting for a second sighting


@dataclass(eq=False)
class PrefixEntry:
    adapter: str
    tokens: tuple[int, ...]
    k: list[torch.Tensor]  # per layer [kv_heads, len(tokens), head_dim]
    v: list[torch.Tensor]
    keys: list[tuple[str, int]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class PrefixStats:
    hits: int = 0
    reused_tokens: int = 0
    stored: int = 0
    evicted: int = 0


def _chunk_hashes(prompt: list[int], chunks: int) -> list[int]:
    """A fingerprint of each prefix of 1..chunks whole chunks, chained chunk by chunk."""
    hashes, h = [], 0
    for c in range(chunks):
        h = hash((h, tuple(prompt[c * PREFILL_CHUNK : (c + 1) * PREFILL_CHUNK])))
        hashes.append(h)
    return hashes


def cacheable_length(prompt_length: int) -> int:
    """The longest chunk-aligned prefix that leaves the prompt's last token to compute
    (its logits give the first answer token)."""
    return (prompt_length - 1) // PREFILL_CHUNK * PREFILL_CHUNK


class PrefixCache:
    """Owned by the engine's scheduler thread (no locking)."""

    def __init__(self, kv: KVCache, budget_bytes: int):
        self.kv = kv
        self.budget_bytes = max(0, int(budget_bytes))
        self.used_bytes = 0
        self.stats = PrefixStats()
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # id -> entry, oldest first
        self._index: dict[tuple[str, int], PrefixEntry] = {}  # (adapter, prefix hash) -> entry
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes >= PREFILL_CHUNK * self.kv.position_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, adapter: str, prompt: list[int]) -> tuple[PrefixEntry | None, int]:
        """The longest cached prefix of `prompt` for this adapter: (entry, positions), or
        (None, 0)."""
        if not self.enabled:
            return None, 0
        hashes = _chunk_hashes(prompt, cacheable_length(len(prompt)) // PREFILL_CHUNK)
        for chunks in range(len(hashes), 0, -1):
            entry = self._index.get((adapter, hashes[chunks - 1]))
            length = chunks * PREFILL_CHUNK
            if entry is not None and entry.tokens[:length] == tuple(prompt[:length]):  # not a hash collision
                self._entries.move_to_end(id(entry))
                return entry, length
        return None, 0

    def restore(self, entry: PrefixEntry, length: int, row: int) -> None:
        """Copy the first `length` cached positions into cache row `row` (grown for them)."""
        for layer in range(len(entry.k)):
            self.kv.k[layer][row, :, :length].copy_(entry.k[layer][:, :length])
            self.kv.v[layer][row, :, :length].copy_(entry.v[layer][:, :length])
        self.stats.hits += 1
        self.stats.reused_tokens += length

    def offer(self, adapter: str, prompt: list[int], row: int) -> None:
        """A prompt was prefilled into `row`: keep its chunk-aligned prefix if this is the
        second time that prefix is seen and it fits the budget."""
        length = cacheable_length(len(prompt))
        if not self.enabled or length == 0:
            return
        hashes = _chunk_hashes(prompt, length // PREFILL_CHUNK)
        key = (adapter, hashes[-1])
        held = self._index.get(key)
        if held is not None and held.length >= length and held.tokens[:length] == tuple(prompt[:length]):
            self._entries.move_to_end(id(held))
            return
        if key not in self._seen:
            self._seen[key] = None
            if len(self._seen) > _SEEN_LIMIT:
                self._seen.popitem(last=False)
            return
        size = length * self.kv.position_bytes
        if size > self.budget_bytes:
            return
        while self.used_bytes + size > self.budget_bytes:
            self._evict_oldest()
        entry = PrefixEntry(
            adapter=adapter,
            tokens=tuple(prompt[:length]),
            k=[cache[row, :, :length].clone() for cache in self.kv.k],
            v=[cache[row, :, :length].clone() for cache in self.kv.v],
        )
        shadowed = set()
        for h in hashes:
            entry.keys.append((adapter, h))
            old = self._index.get((adapter, h))
            if old is not None:
                shadowed.add(old)
            self._index[(adapter, h)] = entry  # the newest entry answers for each shorter prefix too
        self._entries[id(entry)] = entry
        self.used_bytes += size
        self.stats.stored += 1
        for old in shadowed:  # a shorter prefix of this one that no key leads to any more
            if not any(self._index.get(key) is old for key in old.keys):
                self._drop(old)

    def _drop(self, entry: PrefixEntry) -> None:
        del self._entries[id(entry)]
        for key in entry.keys:
            if self._index.get(key) is entry:
                del self._index[key]
        self.used_bytes -= entry.length * self.kv.position_bytes

    def _evict_oldest(self) -> None:
        self._drop(next(iter(self._entries.values())))
        self.stats.evicted += 1

    def clear(self) -> None:
        while self._entries:
            self._evict_oldest()
