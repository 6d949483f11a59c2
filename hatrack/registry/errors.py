"""Registry failures. Each is a HatrackError: str() is one line naming what is at fault."""

from __future__ import annotations

from hatrack.errors import HatrackError


class RegistryError(HatrackError):
    """Base of every registry failure."""


class NotFoundError(RegistryError):
    """An unknown name, version, alias, base or key."""


class InvalidNameError(RegistryError):
    """A name, alias, tag or pattern that does not match the allowed form."""


class ArtifactError(RegistryError):
    """An adapter folder or stored artifact that is missing, corrupt, pickled or lying."""


class LineageError(RegistryError):
    """An adapter whose tensors do not fit the base it is registered against."""


class GateError(RegistryError):
    """A promotion the gate refuses (a worse eval loss than the base or current prod)."""
