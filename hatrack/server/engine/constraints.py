"""Grammar-constrained rows: a JSON schema (or a Lark grammar) becomes a TokenConstraint
that masks each next token to those the grammar still allows.

The grammar engine is llguidance. Both llguidance and xgrammar were tried on the default
base's tokenizer (SmolLM2, 49,152 tokens) on the 2-core CPU box, with a schema of nested
objects, an enum array (minItems/maxItems) and a string pattern:

    per server, tokenizer info:   llguidance 1.2 s     xgrammar 0.5 s
    per schema, compile:          llguidance 6 ms      xgrammar 43 ms
    per token, next-token mask:   llguidance 0.23 ms   xgrammar 0.015 ms  (mean; max 2.8 / 0.18 ms)

xgrammar's masks are faster, but llguidance compiles a schema seven times faster (each new
schema of a request pays it), reports an unsupported schema as one readable message, and
has no torch dependency (xgrammar requires torch and pulls triton, which must never move
hatrack's torch pin). A quarter millisecond per constrained row is small beside a decode
step of the real base on CPU.

Costs are paid once where they can be: the tokenizer info once per tokenizer (cached),
each grammar once (LRU keyed by its JSON text), and only a cheap matcher per row.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("hatrack.engine")

SCHEMA_CACHE_SIZE = 256
# compact JSON: no free whitespace, so a model cannot spend its tokens on blanks
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema or grammar the grammar engine cannot compile; the message says why."""


def json_schema_grammar(schema: dict) -> str:
    """The llguidance grammar of JSON values valid against `schema` (compact JSON)."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as err:
        raise GrammarError(str(err)) from None


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def schema_for_lark(schema: dict) -> str:
    """A JSON schema as the inline `%json {...}` of a Lark rule, with compact JSON."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


class GrammarCompiler:
    """One per server (per tokenizer): compiles grammars once and makes per-row constraints.

    stop_ids: the tokens that end an answer; a constrained row may pick one only where
    its grammar is complete."""

    def __init__(self, tokenizer, stop_ids: tuple[int, ...] | list[int]) -> None:
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self.stop_ids = sorted({int(t) for t in stop_ids})
        # ~1 s for a 50k vocabulary: once per server
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=self.stop_ids or None)
        self._compiled: OrderedDict[str, object] = OrderedDict()  # grammar text -> pristine matcher
        self._lock = threading.Lock()

    def compile(self, grammar: str) -> "CompiledGrammar":
        """Compile `grammar` (from json_schema_grammar / lark_grammar) once; GrammarError
        if it cannot be used. LRU-cached by the grammar's text, which holds the schema's JSON."""
        with self._lock:
            pristine = self._compiled.get(grammar)
            if pristine is not None:
                self._compiled.move_to_end(grammar)
                return CompiledGrammar(pristine)
        pristine = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if pristine.is_error():
            problem = pristine.get_error()
            raise GrammarError(" ".join(line.strip() for line in problem.splitlines() if line.strip())[:500])
        with self._lock:
            self._compiled[grammar] = pristine
            while len(self._compiled) > SCHEMA_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return CompiledGrammar(pristine)

    def json_schema(self, schema: dict) -> "CompiledGrammar":
        return self.compile(json_schema_grammar(schema))


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A compiled grammar; calling it makes a fresh per-row constraint (the engine's
    `SamplingParams.constraint` factory): a copy of the never-used matcher, which shares
    the compiled grammar."""

    pristine: object

    def __call__(self) -> "GrammarConstraint":
        return GrammarConstraint(self.pristine.deep_copy())


class GrammarConstraint:
    """One row's matcher: the allowed next tokens, fed every token the row picks."""

    def __init__(self, matcher) -> None:
        self.matcher = matcher
        self.failed = False

    def allowed_mask(self, vocab_size: int) -> torch.Tensor | None:
        if self.failed:
            return None
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little").astype(bool)
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, allowed.shape[0])
        mask[:n] = torch.from_numpy(allowed[:n])
        if not mask.any():  # nothing fits (should not happen): let the row end rather than fail
            return None
        return mask

    def accept(self, token_id: int) -> None:
        if not self.failed and not self.matcher.consume_token(int(token_id)):
            # the mask forbade it, so only a grammar engine fault lands here: end the row
            self.failed = True
            log.warning("grammar refused token %d: %s", token_id, self.matcher.get_error().splitlines()[0])

    def is_done(self) -> bool:
        return self.failed or self.matcher.is_stopped()
