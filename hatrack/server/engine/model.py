"""A Llama-family forward pass over a loaded Hugging Face model's own modules, with a
per-row KV cache (kv_cache.py) and the slot LoRA term added after each base projection.

Every base projection module is called as-is, so bitsandbytes 4-bit/8-bit layers work
unchanged. Prefill runs the next tokens of several prompts in one forward; decode runs
one new token for each of the rows 0..N-1 of the cache, so the running batch always
occupies the first N cache rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hatrack.server.engine import packed_linear
from hatrack.server.engine.dense_rows import pad_rows
from hatrack.server.engine.errors import EngineError
from hatrack.server.engine.int8_rows import make_rows_independent
from hatrack.server.engine.kv_cache import WINDOW_STEP, KVCache, KVShape
from hatrack.server.engine.slots import LoraRows, SlotBank

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# the attention kernel's query-key products per thread: below this a second thread costs
# more to wake than it saves (bench/RESULTS.md)
ATTENTION_MIN_WORK = 1 << 18
# Without the compiled kernel, decode attends over a window rounded up to WINDOW_STEP
# positions; the plain product/softmax/product gives a row the same bits whatever the
# window (the extra positions are masked), so a row's answer does not depend on the
# lengths of the rows beside it. The kernel reads each row's own positions only.


@dataclass
class PrefillSegment:
    """Prompt tokens `ids` for positions start.. of cache row `row`, with adapter slot
    `slot` (0: the base); logits: whether the last token's logits are wanted."""

    row: int
    ids: list[int]
    start: int = 0
    slot: int = 0
    logits: bool = True


def _slot_runs(segments: list[PrefillSegment], spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(slot, first, end) token ranges of consecutive segments with one adapter slot."""
    runs: list[tuple[int, int, int]] = []
    for s, (a, b) in zip(segments, spans):
        if not s.slot:
            continue
        if runs and runs[-1][0] == s.slot and runs[-1][2] == a:
            runs[-1] = (s.slot, runs[-1][1], b)
        else:
            runs.append((s.slot, a, b))
    return runs


def _apply_runs(bank: SlotBank, runs, layer: int, group: str, x: torch.Tensor, outs) -> None:
    for slot, a, b in runs:
        bank.apply_slot(slot, layer, group, x[a:b], tuple(y[a:b] for y in outs))


@dataclass
class _DecodeWindow:
    """What decode attention needs of one step: its n rows and the positions each attends
    to (int64 [n]); for torch ops, the window (the longest row rounded up to WINDOW_STEP)
    and its mask."""

    n: int
    lengths: torch.Tensor
    length: int
    mask: torch.Tensor | None


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, for _rope: rotate_half(x) * sin, with rotate_half(x)
    = cat(-x2, x1), equals roll(x, half) * cat(-sin1, sin2) bit for bit (a negation is
    exact), in 2 ops a call instead of 5."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class LlamaRunner:
    def __init__(self, model, *, max_batch: int, max_context: int | None, kv_cache_bytes: int | None = None,
                 max_forward_rows: int | None = None, cpu_kernel: bool = True):
        """kv_cache_bytes: the KV cache budget (None: kv_cache.default_budget);
        max_forward_rows: the most prompt tokens and decode rows one forward runs (default
        max_batch), up to which the decoder's projections keep each row's bits;
        cpu_kernel: bf16 projections may run the compiled CPU product (packed_linear.py)."""
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED:
            raise EngineError(
                f"model type {getattr(config, 'model_type', None)!r} is not served by the engine; "
                f"expected one of {', '.join(SUPPORTED)}"
            )
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.n_rep = self.n_heads // self.n_kv
        self.scaling = float(self.layers[0].self_attn.scaling)
        self.vocab_size = int(config.vocab_size)
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        limit = int(getattr(config, "max_position_embeddings", 0) or 0) or 2048
        self.context_length = min(int(max_context), limit) if max_context else limit
        self.max_batch = max_batch
        self.kv = KVCache(
            KVShape(len(self.layers), self.n_kv, self.head_dim, self.dtype), max_batch=max_batch,
            context_length=self.context_length, device=self.device, budget_bytes=kv_cache_bytes,
        )
        self._rows = torch.arange(max_batch, device=self.device)
        self._cols = torch.arange(self.kv.max_capacity, device=self.device)
        # set by the engine where the CPU kernels were built: decode attention's module
        # (cpu_kernel.py), and the prefill LoRA term per token (KernelRows.apply_tokens)
        self.attention_kernel = None
        self.token_lora = None
        self._q_norm = [getattr(layer.self_attn, "q_norm", None) for layer in self.layers]
        self._k_norm = [getattr(layer.self_attn, "k_norm", None) for layer in self.layers]
        # a row's projections give the same bits whatever rows share the call: an int8
        # base picks outlier columns per row (int8_rows.py), dense and weight-only int8
        # ones pad to a probed quantum (dense_rows.py)
        make_rows_independent(self.layers)
        packed_linear.pack([*self.layers, self.lm_head], self.device, self.dtype, own_kernel=cpu_kernel)
        pad_rows(self.layers, max_batch, dtype=self.dtype, max_forward_rows=max_forward_rows)
        pad_rows([self.lm_head], max_batch, dtype=self.dtype)  # logits only for rows that sample

    # ------------------------------------------------------------ forward

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding as Hugging Face's x * cos + rotate_half(x) * sin (same bits);
        signed_sin from _signed_sin."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

    def _qkv(self, layer, i: int, x: torch.Tensor, lora) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [n, heads, d], k and v [n, kv_heads, d] for tokens x [n, hidden]: base
        projections plus the LoRA term, q/k norms applied (Qwen3), no rotary yet."""
        n = x.shape[0]
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        lora(i, "qkv", h, (q, k, v))
        q = q.view(n, self.n_heads, self.head_dim)
        k = k.view(n, self.n_kv, self.head_dim)
        if self._q_norm[i] is not None:
            q, k = self._q_norm[i](q), self._k_norm[i](k)
        return q, k, v.view(n, self.n_kv, self.head_dim)

    def _out_and_mlp(self, layer, i: int, x: torch.Tensor, o: torch.Tensor, lora) -> torch.Tensor:
        """The residual stream after attention output o [n, heads * d] and the MLP."""
        a = layer.self_attn.o_proj(o)
        lora(i, "o", o, (a,))
        return self._mlp(layer, i, x + a, lora)

    def _mlp(self, layer, i: int, x: torch.Tensor, lora) -> torch.Tensor:
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp
        gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        lora(i, "gate_up", h, (gate, up))
        m = mlp.act_fn(gate) * up
        down = mlp.down_proj(m)
        lora(i, "down", m, (down,))
        return x + down

    def prefill(self, segments: list[PrefillSegment], bank: SlotBank) -> torch.Tensor:
        """Run several prompts' next tokens through the model in one forward: each
        segment's tokens go to positions start.. of its cache row (which kv.grow made
        room for) and attend to that row's earlier positions. The linear layers see every
        token at once; attention and the LoRA term run per segment. Returns the logits of
        the last token of each segment that wants them, in order [wanting, vocab]; the LM
        head runs on those positions only."""
        spans, pos, masks = self._prompt_geometry(segments)
        runs = _slot_runs(segments, spans)
        if not runs:
            lora = lambda *a: None  # noqa: E731
        elif self.token_lora is not None:  # one kernel call per module group, every token its own slot
            slots = torch.zeros(spans[-1][1], dtype=torch.int64)
            for slot, a, b in runs:
                slots[a:b] = slot
            groups = bank.groups_of([slot for slot, _, _ in runs])
            lora = lambda i, g, x, outs: self.token_lora(slots, groups, i, g, x, outs)  # noqa: E731
        else:
            lora = lambda i, g, x, outs: _apply_runs(bank, runs, i, g, x, outs)  # noqa: E731
        ids = torch.tensor([t for s in segments for t in s.ids], device=self.device)
        x = self.embed(ids)
        cos, sin = self._prompt_rotary(x, pos)
        width = self.n_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, i, x, lora)
            o = x.new_empty(x.shape[0], width)
            self._attend_prompts(i, segments, spans, masks, q, k, v, cos, sin, o)
            x = self._out_and_mlp(layer, i, x, o, lora)
        last = [b - 1 for s, (_, b) in zip(segments, spans) if s.logits]
        return self.lm_head(self.norm(x[last]))

    def _prompt_geometry(self, segments: list[PrefillSegment]):
        """Each prompt segment's (start, end) among the forward's prompt tokens, their
        positions [T], and each segment's attention mask (None: causal from position 0)."""
        lengths = [len(s.ids) for s in segments]
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        spans = list(zip(bounds, bounds[1:]))
        pos = torch.cat([self._cols[s.start : s.start + n] for s, n in zip(segments, lengths)])
        # a segment after earlier positions attends to them: causal from its own start
        masks = [
            (self._cols[None, : s.start + n] <= self._cols[s.start : s.start + n, None]) if s.start else None
            for s, n in zip(segments, lengths)
        ]
        return spans, pos, masks

    def _attend_prompts(self, i: int, segments: list[PrefillSegment], spans, masks, q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        o: torch.Tensor) -> None:
        """Layer i's attention for prompt tokens: q [T, heads, d], k and v [T, kv_heads, d]
        before rotary (cos, sin [T, d]); writes each segment's keys and values to its cache
        row and its output to o [T, heads * d]."""
        width = o.shape[1]
        q = self._rope(q.transpose(0, 1), cos, sin)  # [heads, T, d]
        k = self._rope(k.transpose(0, 1), cos, sin)
        v = v.transpose(0, 1)
        k_cache, v_cache = self.kv.k[i], self.kv.v[i]
        for s, (a, b), mask in zip(segments, spans, masks):
            end = s.start + b - a
            k_cache[s.row, :, s.start : end] = k[:, a:b]
            v_cache[s.row, :, s.start : end] = v[:, a:b]
            if mask is None:  # from position 0: the segment's own keys
                keys, values = k[None, :, a:b], v[None, :, a:b]
            else:
                keys, values = k_cache[None, s.row, :, :end], v_cache[None, s.row, :, :end]
            out = F.scaled_dot_product_attention(
                q[None, :, a:b], keys, values, attn_mask=mask, is_causal=mask is None,
                scale=self.scaling, enable_gqa=self.n_rep > 1,
            )
            o[a:b] = out[0].transpose(0, 1).reshape(b - a, width)

    def _prompt_rotary(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, head_dim] of prompt positions pos [T] (x: their embeddings)."""
        cos, sin = self.rotary(x[None], pos[None])
        return cos[0], _signed_sin(sin)[0]  # broadcast over heads

    def _decode_rotary(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [n, 1, head_dim] of decode rows at positions pos [n]."""
        cos, sin = self.rotary(x[:, None], pos[:, None])
        return cos, _signed_sin(sin)

    def _attend(self, q: torch.Tensor, i: int, window: _DecodeWindow,
                new: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Decode attention of layer i for queries q [n, kv_heads, n_rep, d]. On CPU the
        compiled kernel (csrc/attention_cpu.cpp) where it was built: each row over its own
        positions, in a fixed order, in one call, which first writes `new` (the step's keys
        and values, [n, kv_heads, d] each) to the cache. Otherwise on CPU the plain product,
        softmax, product, whose every row is its own batch entry and whose masked positions
        add exact zeros. torch's fused kernel gives a row other bits with another batch or
        window (measured: fp32 at 2 threads; bf16 on an AVX-512 BF16 CPU, where 1 of 99
        greedy answers on the real base changed in a batch of 32). CUDA keeps the fused
        kernel."""
        k_cache, v_cache = self.kv.k[i], self.kv.v[i]
        if self.attention_kernel is not None:
            out = torch.empty_like(q)
            k_new, v_new = new if new is not None else (None, None)
            self.attention_kernel.attend_decode(q, k_cache, v_cache, window.lengths, out, self.scaling,
                                                ATTENTION_MIN_WORK, k_new=k_new, v_new=v_new)
            return out
        k, v = k_cache[: window.n, :, : window.length], v_cache[: window.n, :, : window.length]
        if q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=window.mask, scale=self.scaling)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        return torch.matmul(torch.softmax(scores.masked_fill(~window.mask, float("-inf")), dim=-1), v)

    def decode(self, tokens: list[int], positions: list[int], rows: LoraRows, slots: list[int]) -> torch.Tensor:
        """One new token for each of the rows 0..N-1; tokens[r] goes to position
        positions[r] of row r (which kv.grow made room for). Returns logits [N, vocab]."""
        n = len(tokens)
        length = -(-(max(positions) + 1) // WINDOW_STEP) * WINDOW_STEP
        lora = (lambda i, g, x, outs: rows.apply(n, i, g, x, outs)) if rows.prepare(slots) else (lambda *a: None)
        tok = torch.tensor(tokens, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        row_ids = self._rows[:n]
        # torch ops attend to positions 0..pos[r] of row r; the rest of the window is masked
        mask = None if self.attention_kernel is not None else (
            (self._cols[None, :length] <= pos[:, None]).view(n, 1, 1, length))
        window = _DecodeWindow(n, pos + 1, length, mask)
        x = self.embed(tok)
        cos, sin = self._decode_rotary(x, pos)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, i, x, lora)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            if self.attention_kernel is None:
                k_cache, v_cache = self.kv.k[i], self.kv.v[i]
                k_cache[row_ids, :, pos] = k
                v_cache[row_ids, :, pos] = v
                new = None
            else:  # the kernel writes them to the cache itself
                new = (k, v)
            # GQA without copies: the n_rep query heads sharing a KV head become that
            # head's n_rep "query positions" (one token each, so no causal mask needed)
            o = self._attend(q.view(n, self.n_kv, self.n_rep, self.head_dim), i, window, new)
            o = o.reshape(n, self.n_heads * self.head_dim)
            x = self._out_and_mlp(layer, i, x, o, lora)
        return self.lm_head(self.norm(x))

    def step(self, tokens: list[int], positions: list[int], slots: list[int], segments: list[PrefillSegment],
             bank: SlotBank) -> tuple[torch.Tensor, torch.Tensor]:
        """decode() of rows 0..n-1 and prefill() of `segments` (other rows) in one forward,
        so the weights are read once for both: a prompt that arrives while answers run
        costs its own tokens, not a forward of its own. Each decode row and prompt token
        goes through the same ops on the same values as in decode() and prefill(), so it
        gets the same bits: only the projections and the LM head see more rows, and their
        rows do not depend on their company (dense_rows.py; the LoRA kernel's sums are per
        row). Needs the CPU kernels (attention_kernel and token_lora). slots: each decode
        row's adapter slot. Returns (logits of the decode rows [n, vocab], logits of the
        segments that want them [wanting, vocab])."""
        n = len(tokens)
        spans, pos_p, masks = self._prompt_geometry(segments)
        token_slots = slots + [s.slot for s in segments for _ in s.ids]
        if max(token_slots):
            slot_ids = torch.tensor(token_slots, dtype=torch.int64)
            groups = bank.groups_of(sorted(set(token_slots)))
            lora = lambda i, g, x, outs: self.token_lora(slot_ids, groups, i, g, x, outs)  # noqa: E731
        else:
            lora = lambda *a: None  # noqa: E731
        ids = torch.tensor(tokens + [t for s in segments for t in s.ids], device=self.device)
        pos_d = torch.tensor(positions, device=self.device)
        window = _DecodeWindow(n, pos_d + 1, 0, None)  # the kernel reads each row's own positions
        x = self.embed(ids)
        cos_d, sin_d = self._decode_rotary(x[:n], pos_d)
        cos_p, sin_p = self._prompt_rotary(x[n:], pos_p)
        width = self.n_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, i, x, lora)
            o = x.new_empty(x.shape[0], width)
            q_d, k_d = self._rope(q[:n], cos_d, sin_d), self._rope(k[:n], cos_d, sin_d)
            out = self._attend(q_d.view(n, self.n_kv, self.n_rep, self.head_dim), i, window, (k_d, v[:n]))
            o[:n] = out.reshape(n, width)
            self._attend_prompts(i, segments, spans, masks, q[n:], k[n:], v[n:], cos_p, sin_p, o[n:])
            x = self._out_and_mlp(layer, i, x, o, lora)
        last = [*range(n), *(n + b - 1 for s, (_, b) in zip(segments, spans) if s.logits)]
        logits = self.lm_head(self.norm(x[last]))
        return logits[:n], logits[n:]
