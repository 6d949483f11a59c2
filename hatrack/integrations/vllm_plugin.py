"""vLLM's entry point (`vllm.general_plugins`: hatrack): registers hatrack's registry as a
LoRA resolver. vLLM calls it for a model name it does not know yet, when started with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=true and --enable-lora. The work is in resolver.py."""

from __future__ import annotations

import asyncio

RESOLVER_NAME = "hatrack"


def register() -> None:
    """Called by vLLM in each of its processes; vllm is imported only here."""
    from vllm.logger import init_logger
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    from hatrack.integrations.resolver import RegistryResolver

    class HatrackLoRAResolver(LoRAResolver):
        def __init__(self) -> None:
            # a logger under vLLM's, so refusals appear in vLLM's own log
            self.core = RegistryResolver(logger=init_logger("vllm.plugins.hatrack"))

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            # registry queries and the first sha256 check block: keep them off vLLM's loop
            found = await asyncio.to_thread(self.core.resolve, base_model_name, lora_name)
            if found is None:
                return None
            return LoRARequest(lora_name=found.lora_name, lora_int_id=found.int_id, lora_path=str(found.path))

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, HatrackLoRAResolver())
