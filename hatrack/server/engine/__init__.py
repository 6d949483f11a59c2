"""hatrack's serving engine: multi-LoRA continuous batching in plain torch.

    engine = Engine(model, tokenizer, max_loaded=8)
    engine.start()
    handle = engine.submit(prompt_ids, AdapterSpec(key, load), SamplingParams(max_tokens=32))
    tokens, finish_reason = handle.result()      # or: async for event in handle: ...
"""

from hatrack.server.engine.engine import Engine
from hatrack.server.engine.errors import (
    AdapterFormatError,
    EngineError,
    EngineMemoryError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)
from hatrack.server.engine.handle import RequestHandle
from hatrack.server.engine.lora import LoraWeights, load_peft_adapter
from hatrack.server.engine.types import AdapterSpec, EngineStats, SamplingParams, TokenConstraint, TokenEvent

__all__ = [
    "AdapterFormatError",
    "AdapterSpec",
    "Engine",
    "EngineError",
    "EngineMemoryError",
    "EngineStats",
    "EngineStoppedError",
    "InvalidRequestError",
    "LoraWeights",
    "PromptTooLongError",
    "QueueFullError",
    "RequestHandle",
    "SamplingParams",
    "TokenConstraint",
    "TokenEvent",
    "load_peft_adapter",
]
