"""Names, aliases, references (`name`, `name@3`, `name@alias`) and tag syntax.
Checked before anything touches the disk or the database."""

from __future__ import annotations

import re
from dataclasses import dataclass

from hatrack.registry.errors import InvalidNameError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TAG_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PATTERN_RE = re.compile(r"^[a-z0-9._*?\[\]!-]{1,64}$")
PROD = "prod"


def validate_name(name: str) -> str:
    """`name` itself when it matches ^[a-z0-9][a-z0-9._-]{0,63}$, else InvalidNameError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid name {name!r}: expected lowercase letters, digits, '.', '_' or '-' "
            f"(1-64 characters, starting with a letter or digit)"
        )
    return name


def validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not NAME_RE.fullmatch(alias):
        raise InvalidNameError(
            f"invalid alias {alias!r}: expected lowercase letters, digits, '.', '_' or '-'"
        )
    if alias.isdigit():
        raise InvalidNameError(f"invalid alias {alias!r}: an alias is never all digits (those are versions)")
    return alias


def validate_tag_key(key: str) -> str:
    if not isinstance(key, str) or not TAG_KEY_RE.fullmatch(key):
        raise InvalidNameError(f"invalid tag key {key!r}: expected letters, digits, '.', '_' or '-' (1-64)")
    return key


def validate_tag_value(key: str, value: str) -> str:
    if not isinstance(value, str) or len(value) > 256 or any(c in value for c in "\r\n\0"):
        raise InvalidNameError(f"invalid value for tag {key!r}: at most 256 characters on one line")
    return value


def validate_tags(tags: dict[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        out[validate_tag_key(key)] = validate_tag_value(key, str(value))
    return out


def parse_tag(text: str) -> tuple[str, str]:
    """`k=v` -> (k, v)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidNameError(f"invalid tag {text!r}: expected key=value")
    return validate_tag_key(key), validate_tag_value(key, value)


def validate_pattern(pattern: str) -> str:
    if not isinstance(pattern, str) or not PATTERN_RE.fullmatch(pattern):
        raise InvalidNameError(
            f"invalid pattern {pattern!r}: expected a glob over adapter names, like 'acme-*'"
        )
    return pattern


@dataclass(frozen=True)
class Ref:
    """A parsed reference: `name`, `name@3` (version) or `name@alias`."""

    name: str
    version: int | None = None
    alias: str | None = None


def parse_ref(ref: str) -> Ref:
    if not isinstance(ref, str):
        raise InvalidNameError(f"invalid model reference {ref!r}")
    name, sep, selector = ref.partition("@")
    validate_name(name)
    if not sep:
        return Ref(name)
    if selector.isdigit():
        version = int(selector)
        if version < 1:
            raise InvalidNameError(f"invalid version in {ref!r}: versions start at 1")
        return Ref(name, version=version)
    if not NAME_RE.fullmatch(selector):
        raise InvalidNameError(f"invalid reference {ref!r}: expected NAME, NAME@VERSION or NAME@ALIAS")
    return Ref(name, alias=selector)
