"""Adapter weights in stacked per-layer "slot" tensors, and their per-row gather.

SlotBank is the device tier of the adapter cache. For each target module it holds
A [layers, slots+1, in, rank] (the modules of a group side by side in the last
dimension) and B [layers, slots+1, rank, out] with the scaling folded into B. Slot 0 is all zeros and means "no adapter" (never an index of -1).
Loading an adapter is a copy into a free slot. Smaller ranks are zero-padded and
modules an adapter does not target stay zero.

RowBank is the gather of those slots by batch row: row r holds a copy of its
sequence's slot, so applying N different adapters is one batched matmul for the
shrink of each group of modules sharing an input (q/k/v, o, gate/up, down) and one
batched matmul per module for the expand. The gather is redone for a row only when
the row gets a new sequence, not at every step: in steady decoding it costs nothing.
Each row's result comes from its own batch entry of the matmul, so it does not depend
on which other rows share the batch.

KernelRows does the same on CPU without copies: the compiled kernel (cpu_kernel.py)
reads each row's adapter in place from the slot bank, so the bank can hold bf16
weights on a bf16 model (half the bytes a decode step must read). Without the kernel,
the LoRA weights on CPU are fp32: torch's batched matmul is several times faster there
in fp32 than in bf16, and the term is added to the base output in the model's dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch

from hatrack.server.engine.errors import AdapterFormatError
from hatrack.server.engine.lora import LoraWeights

# (group, module suffixes): the modules of a group read the same input
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o", ("self_attn.o_proj",)),
    ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", ("mlp.down_proj",)),
)
SUFFIXES = dict(GROUPS)
_GROUP_OF = {suffix: group for group, suffixes in GROUPS for suffix in suffixes}
_MODULE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")
_RANK_STEP = 8  # bank rank grows in multiples of this


def lora_dtype_for(device: torch.device, model_dtype: torch.dtype, cpu_kernel: bool = False) -> torch.dtype:
    if device.type != "cpu":
        return model_dtype
    return model_dtype if cpu_kernel and model_dtype in (torch.float32, torch.bfloat16) else torch.float32


@dataclass(frozen=True)
class _Part:
    """Where one module's A^T [in, r] and scaled B^T [r, out] lie in a StagedAdapter's buffer."""

    layer: int
    group: str
    suffix: str
    j: int  # the module's place in its group
    r: int
    a_at: int
    b_at: int
    in_dim: int
    out_dim: int


@dataclass
class StagedAdapter:
    """An adapter as a slot holds it, in one host buffer: every module's A transposed and
    its B transposed with the scaling folded in, in the bank's dtype. Made on a loader
    thread, so swapping it in on the engine thread is one copy to the device (pinned
    memory and non-blocking on CUDA) and copies within the device."""

    rank: int
    groups: frozenset[str]
    buffer: torch.Tensor  # flat, bank dtype, pinned when the bank is on CUDA
    parts: tuple[_Part, ...]


class SlotBank:
    """A [layers, slots+1, in, n_modules * rank] per group (its modules side by side,
    so a group's shrink is one matmul) and B [layers, slots+1, rank, out] per module."""

    def __init__(self, layers, n_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.n_layers = len(layers)
        self.n_slots = n_slots
        self.max_rank = max_rank
        self.dtype, self.device = dtype, device
        self.in_dim: dict[str, int] = {}
        self.out_dim: dict[str, int] = {}
        for group, suffixes in GROUPS:
            for suffix in suffixes:
                module = layers[0].get_submodule(suffix)
                self.in_dim[group] = int(module.in_features)
                self.out_dim[suffix] = int(module.out_features)
        self.rank = 0  # 0 until the first adapter is written; growing it reallocates A and B
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.slot_groups: list[frozenset[str]] = [frozenset()] * (n_slots + 1)
        self.version = [0] * (n_slots + 1)  # bumped on every write: stale row copies are redone

    def check(self, weights: LoraWeights, name: str) -> None:
        """Raise AdapterFormatError unless `weights` fits this model and the bank."""
        if weights.rank > self.max_rank:
            raise AdapterFormatError(f"adapter {name}: rank {weights.rank} exceeds the engine's max_rank {self.max_rank}")
        if not weights.modules:
            raise AdapterFormatError(f"adapter {name}: holds no modules")
        for module, (a, b) in weights.modules.items():
            match = _MODULE.match(module)
            if not match or match[2] not in _GROUP_OF:
                raise AdapterFormatError(
                    f"adapter {name}: module {module!r} is not a q/k/v/o/gate/up/down projection the engine can serve"
                )
            layer, suffix = int(match[1]), match[2]
            if layer >= self.n_layers:
                raise AdapterFormatError(f"adapter {name}: module {module!r} names layer {layer}; the base has {self.n_layers}")
            want_in, want_out = self.in_dim[_GROUP_OF[suffix]], self.out_dim[suffix]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != want_in or b.shape[0] != want_out or a.shape[0] != b.shape[1]:
                raise AdapterFormatError(
                    f"adapter {name}: module {module!r} has A {list(a.shape)} and B {list(b.shape)}, "
                    f"expected A [r, {want_in}] and B [{want_out}, r]"
                )
            if a.shape[0] > self.max_rank:
                raise AdapterFormatError(f"adapter {name}: module {module!r} rank {a.shape[0]} exceeds max_rank {self.max_rank}")

    def stage(self, weights: LoraWeights) -> StagedAdapter:
        """The adapter (already checked) laid out for `write`: the casts, transposes and
        scaling are done here, off the engine thread, with the values a direct copy
        would give (float32 arithmetic, then one rounding to the bank's dtype)."""
        parts, pieces, at = [], [], 0
        for module, (a, b) in weights.modules.items():
            match = _MODULE.match(module)
            layer, suffix = int(match[1]), match[2]
            group = _GROUP_OF[suffix]
            a_t = a.to(torch.float32).t().to(self.dtype).reshape(-1)
            b_t = (b.to(torch.float32).t() * weights.scaling).to(self.dtype).reshape(-1)
            r = a.shape[0]
            parts.append(_Part(layer, group, suffix, SUFFIXES[group].index(suffix), r, at, at + a_t.numel(),
                               a.shape[1], b.shape[0]))
            pieces += [a_t, b_t]
            at += a_t.numel() + b_t.numel()
        buffer = torch.cat(pieces) if pieces else torch.zeros(0, dtype=self.dtype)
        if self.device.type == "cuda":
            try:
                buffer = buffer.pin_memory()
            except RuntimeError:  # no page-locked memory left: the copy in blocks, but works
                pass
        return StagedAdapter(weights.rank, frozenset(p.group for p in parts), buffer, tuple(parts))

    def write(self, slot: int, weights: LoraWeights | StagedAdapter) -> None:
        """Copy an adapter (already checked; staged or not) into `slot`, replacing what was there."""
        assert 1 <= slot <= self.n_slots
        if isinstance(weights, LoraWeights):
            weights = self.stage(weights)
        if weights.rank > self.rank:
            self._grow(weights.rank)
        try:
            self._copy_in(slot, weights)
        except BaseException:
            # half written: the slot holds nothing usable, and row copies of it are stale
            self.slot_groups[slot] = frozenset()
            self.version[slot] += 1
            raise

    def _copy_in(self, slot: int, staged: StagedAdapter) -> None:
        for group, suffixes in GROUPS:
            self.A[group][:, slot].zero_()
            for suffix in suffixes:
                self.B[suffix][:, slot].zero_()
        # one host-to-device copy; from pinned memory it does not block the engine thread,
        # and the copies below queue behind it on the same stream
        buffer = staged.buffer.to(self.device, non_blocking=True)
        rank = self.rank
        for p in staged.parts:
            a_t = buffer[p.a_at : p.a_at + p.in_dim * p.r].view(p.in_dim, p.r)
            b_t = buffer[p.b_at : p.b_at + p.r * p.out_dim].view(p.r, p.out_dim)
            self.A[p.group][p.layer, slot, :, p.j * rank : p.j * rank + p.r].copy_(a_t)
            self.B[p.suffix][p.layer, slot, : p.r].copy_(b_t)
        self.slot_groups[slot] = staged.groups
        self.version[slot] += 1

    def _grow(self, rank: int) -> None:
        """Reallocate A and B at a larger rank, all or nothing: every new tensor is
        allocated before any replaces the old, so an allocation failure (out of memory)
        leaves the bank as it was, at its old rank."""
        new = min(self.max_rank, -(-rank // _RANK_STEP) * _RANK_STEP)
        old = self.rank
        kw = dict(dtype=self.dtype, device=self.device)
        s1 = self.n_slots + 1
        A: dict[str, torch.Tensor] = {}
        B: dict[str, torch.Tensor] = {}
        for group, suffixes in GROUPS:
            A[group] = torch.zeros(self.n_layers, s1, self.in_dim[group], len(suffixes) * new, **kw)
            for suffix in suffixes:
                B[suffix] = torch.zeros(self.n_layers, s1, new, self.out_dim[suffix], **kw)
        if old:
            for group, suffixes in GROUPS:
                for j in range(len(suffixes)):
                    A[group][..., j * new : j * new + old].copy_(self.A[group][..., j * old : (j + 1) * old])
                for suffix in suffixes:
                    B[suffix][:, :, :old].copy_(self.B[suffix])
        self.A, self.B, self.rank = A, B, new

    def groups_of(self, row_slots: list[int]) -> frozenset[str]:
        """The module groups any of these slots' adapters touch."""
        return frozenset().union(*(self.slot_groups[slot] for slot in row_slots))

    def apply_slot(self, slot: int, layer: int, group: str, x: torch.Tensor, outs: tuple[torch.Tensor, ...]) -> None:
        """outs[j] += LoRA term of one slot's module j of `group` for every row of x (a prefill)."""
        if slot == 0 or group not in self.slot_groups[slot]:
            return
        r = self.rank
        xa = x.to(self.dtype) @ self.A[group][layer, slot]  # [rows, n_modules * r]
        for j, (suffix, y) in enumerate(zip(SUFFIXES[group], outs)):
            y.add_(xa[:, j * r : (j + 1) * r] @ self.B[suffix][layer, slot])


class LoraRows(Protocol):
    """The per-row LoRA term of a decode step: what the model runner needs of RowBank
    (torch ops over per-row copies) and KernelRows (the CPU kernel, in place)."""

    def prepare(self, row_slots: list[int]) -> bool:
        """Rows 0..N-1 take their slots' adapters; False if no row uses an adapter."""
        ...

    def apply(self, n: int, layer: int, group: str, x: torch.Tensor, outs: tuple[torch.Tensor, ...]) -> None:
        """outs[j] += each row's own LoRA term for module j of `group`; x is [n, in]."""
        ...


class RowBank:
    """Per-row copies of slots: A [layers, rows, in, n_modules * rank] per group (the
    group's modules side by side) and B [layers, rows, rank, out] per module."""

    def __init__(self, slots: SlotBank, max_rows: int):
        self.slots = slots
        self.max_rows = max_rows
        self.capacity = 0
        self.rank = 0
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self._held: list[tuple[int, int] | None] = []  # row -> (slot, slot version) it holds
        self._groups: frozenset[str] = frozenset()

    def _allocate(self, rows: int) -> None:
        """Reallocate the row copies (more rows, or the bank's new rank). Every row is
        gathered again afterwards, so the old copies go first (a lower peak); an allocation
        failure leaves no copies at all (capacity 0), which the next prepare redoes."""
        s = self.slots
        new = min(self.max_rows, max(rows, 8, 2 * self.capacity))
        kw = dict(dtype=s.dtype, device=s.device)
        self.A, self.B, self.capacity, self._held = {}, {}, 0, []
        A: dict[str, torch.Tensor] = {}
        B: dict[str, torch.Tensor] = {}
        for group, suffixes in GROUPS:
            A[group] = torch.zeros(s.n_layers, new, s.in_dim[group], len(suffixes) * s.rank, **kw)
            for suffix in suffixes:
                B[suffix] = torch.zeros(s.n_layers, new, s.rank, s.out_dim[suffix], **kw)
        self.A, self.B = A, B
        self.capacity, self.rank = new, s.rank
        self._held = [None] * new  # everything is gathered again

    def _gather(self, row: int, slot: int) -> None:
        s = self.slots
        for group, suffixes in GROUPS:
            self.A[group][:, row].copy_(s.A[group][:, slot])
            for suffix in suffixes:
                self.B[suffix][:, row].copy_(s.B[suffix][:, slot])
        self._held[row] = (slot, s.version[slot])

    def prepare(self, row_slots: list[int]) -> bool:
        """Make rows 0..N-1 hold their slots' weights; False if no row uses an adapter."""
        if max(row_slots) == 0:
            return False
        s = self.slots
        if self.rank != s.rank or self.capacity < len(row_slots):
            self._allocate(len(row_slots))
        for row, slot in enumerate(row_slots):
            if self._held[row] != (slot, s.version[slot]):
                self._gather(row, slot)
        self._groups = s.groups_of(row_slots)
        return True

    def apply(self, n: int, layer: int, group: str, x: torch.Tensor, outs: tuple[torch.Tensor, ...]) -> None:
        """outs[j] += each row's own LoRA term for module j of `group`; x is [n, in]."""
        if group not in self._groups:
            return
        r = self.rank
        xa = torch.bmm(x.to(self.slots.dtype)[:, None], self.A[group][layer, :n])  # [n, 1, n_modules * r]
        for j, (suffix, y) in enumerate(zip(SUFFIXES[group], outs)):
            y.add_(torch.bmm(xa[:, :, j * r : (j + 1) * r], self.B[suffix][layer, :n])[:, 0])


class KernelRows:
    """RowBank's interface over the CPU kernel: no per-row copies; each row's adapter is
    read where it lies in the slot bank."""

    def __init__(self, slots: SlotBank, kernel) -> None:
        self.slots = slots
        self.kernel = kernel
        self._row_slots = torch.zeros(0, dtype=torch.int64)
        self._groups: frozenset[str] = frozenset()
        # per (layer, group): the bank's A and B views, built once per bank rank (its
        # tensors are reallocated when the rank grows); 120 kernel calls a step on a
        # 30-layer model, and views are not free
        self._views: dict[tuple[int, str], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._views_rank = -1

    def prepare(self, row_slots: list[int]) -> bool:
        """Remember each row's slot; False if no row uses an adapter."""
        if max(row_slots) == 0:
            return False
        self._row_slots = torch.tensor(row_slots, dtype=torch.int64)
        self._groups = self.slots.groups_of(row_slots)
        return True

    def apply(self, n: int, layer: int, group: str, x: torch.Tensor, outs: tuple[torch.Tensor, ...]) -> None:
        """outs[j] += each row's own LoRA term for module j of `group`; x is [n, in]."""
        if group in self._groups:
            self._run(self._row_slots, layer, group, x, outs)

    def apply_tokens(self, slots: torch.Tensor, groups: frozenset[str], layer: int, group: str, x: torch.Tensor,
                     outs: tuple[torch.Tensor, ...]) -> None:
        """A prefill's LoRA term: outs[j] += token t's own slot's term, slots [T] int64 (0:
        the base), `groups` the groups those slots touch. The kernel's per-row sums give a
        token the same bits in any forward, as in decode."""
        if group in groups:
            self._run(slots, layer, group, x, outs)

    def _run(self, slots: torch.Tensor, layer: int, group: str, x: torch.Tensor, outs: tuple[torch.Tensor, ...]) -> None:
        s = self.slots
        if self._views_rank != s.rank:
            self._views.clear()
            self._views_rank = s.rank
        views = self._views.get((layer, group))
        if views is None:
            views = (s.A[group][layer], [s.B[suffix][layer] for suffix in SUFFIXES[group]])
            self._views[layer, group] = views
        if x.dtype != outs[0].dtype or x.stride(-1) != 1:
            x = x.to(outs[0].dtype).contiguous()
        self.kernel.lora_decode(x, slots, views[0], views[1], list(outs), s.rank)
