"""What a request's `model` field names: the served base, or an adapter version from
the registry, turned into an engine AdapterSpec. Looked up on every request, so an
adapter registered while the server runs is servable on its next request."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hatrack.errors import HatrackError
from hatrack.registry import NotFoundError, Registry, RegistryError, ResolvedModel
from hatrack.server.engine import AdapterSpec, load_peft_adapter

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}(@[a-z0-9][a-z0-9._-]{0,63})?$")


class ModelNotFound(Exception):
    """Unknown, forbidden or malformed model name: always the same 404 answer."""


class BaseMismatch(Exception):
    """The adapter was trained on another base than the one this server holds."""


class AdapterUnavailable(HatrackError):
    """A registered adapter whose stored artifact cannot be served (corrupt, missing,
    lying about its tensors): the request that wants it gets a 4xx, others go on."""


@dataclass(frozen=True)
class Target:
    resolved: ResolvedModel
    adapter: AdapterSpec | None

    @property
    def label(self) -> str:
        return self.resolved.label


class Catalog:
    def __init__(self, registry: Registry, base_name: str, base_fingerprint: str) -> None:
        self.registry = registry
        self.base_name = base_name
        self.base_fingerprint = base_fingerprint
        self._specs: dict[str, AdapterSpec] = {}

    def lookup(self, model: str, allowed) -> Target:
        """Resolve `model` for a caller; `allowed(name) -> bool` is the caller's key check.
        Names are checked before anything else touches the registry."""
        if not _NAME.fullmatch(model):  # fullmatch: `$` would let a trailing newline through
            raise ModelNotFound(model)
        if model == self.base_name:
            return Target(self._base(), None)
        if not allowed(model.split("@", 1)[0]):
            raise ModelNotFound(model)
        try:
            resolved = self.registry.resolve(model)
        except (NotFoundError, RegistryError):
            raise ModelNotFound(model) from None
        if resolved.kind == "base":
            # another registered base: this server holds only one
            raise ModelNotFound(model)
        if resolved.base_fingerprint != self.base_fingerprint:
            raise BaseMismatch(
                f"model '{resolved.label}' was trained on base '{resolved.base_name}', "
                f"which is not the base this server holds ('{self.base_name}')"
            )
        return Target(resolved, self._spec(resolved))

    def listing(self, allowed) -> list[dict]:
        """The base and every adapter name the caller may use, on this base."""
        seen: dict[str, int] = {}
        for row in self.registry.list_versions(base=self.base_name):
            if row.get("status", "ready") != "ready" or not allowed(row["name"]):
                continue
            created = row.get("created_ts") or row.get("created") or 0
            seen.setdefault(row["name"], created if isinstance(created, int) else 0)
        items = [{"id": self.base_name, "object": "model", "created": 0, "owned_by": "hatrack"}]
        for name, created in sorted(seen.items()):
            items.append(
                {"id": name, "object": "model", "created": created, "owned_by": "hatrack",
                 "parent": self.base_name}
            )
        return items

    def live_labels(self) -> set[str]:
        """The base name and every `name@version` of this base still in the registry."""
        labels = {self.base_name}
        for row in self.registry.list_versions(base=self.base_name):
            labels.add(f"{row['name']}@{row['version']}")
        return labels

    def _base(self) -> ResolvedModel:
        return ResolvedModel(
            kind="base", name=self.base_name, version=None, base_name=self.base_name,
            base_fingerprint=self.base_fingerprint, sha256=None,
        )

    def _spec(self, resolved: ResolvedModel) -> AdapterSpec:
        key = f"{resolved.label}:{resolved.sha256}"
        spec = self._specs.get(key)
        if spec is None:
            spec = AdapterSpec(key=key, load=lambda: self._load(resolved.sha256))
            self._specs[key] = spec
        return spec

    def _load(self, sha256: str):
        # verified (sha256, no symlinks) every time it is read from disk
        try:
            return load_peft_adapter(self.registry.open_artifact(sha256))
        except HatrackError:
            raise
        except Exception as err:  # anything else a damaged file can raise is still the adapter's fault
            raise AdapterUnavailable(f"its stored files cannot be read ({type(err).__name__})") from None
