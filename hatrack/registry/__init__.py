"""hatrack's registry: base models, adapter versions with lineage and scores, aliases
with a promotion gate, a content-addressed artifact store, pruning and API keys.
Imports no torch."""

from hatrack.registry.errors import (
    ArtifactError,
    GateError,
    InvalidNameError,
    LineageError,
    NotFoundError,
    RegistryError,
)
from hatrack.registry.keys import key_allows
from hatrack.registry.names import parse_ref, validate_alias, validate_name
from hatrack.registry.records import (
    BaseRecord,
    DatasetInfo,
    KeyRecord,
    ResolvedModel,
    ScoreIn,
    VersionRecord,
)
from hatrack.registry.registry import Registry

__all__ = [
    "ArtifactError", "BaseRecord", "DatasetInfo", "GateError", "InvalidNameError", "KeyRecord",
    "LineageError", "NotFoundError", "Registry", "RegistryError", "ResolvedModel", "ScoreIn",
    "VersionRecord", "key_allows", "parse_ref", "validate_alias", "validate_name",
]
