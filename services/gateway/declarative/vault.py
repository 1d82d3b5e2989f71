"""Vault references in plugin configuration, resolved as Kong 3.9's `env` vault resolves them.

A field Kong marks `referenceable` may hold `{vault://env/some-name}` instead of a value, so a
secret (the gateway identity key) never appears in kong.yml or its rendered copy: Kong reads the
environment variable SOME_NAME (upper case, dashes to underscores; kong/vaults/env). The local
gateway does the same from the environment it is given, after validation, and refuses at start a
reference it cannot resolve (Kong would log a warning and leave the field empty). A resolved value
must satisfy the field as a literal would. Other vaults, and the env vault's `/key`, `?query` and
`#version` forms, are refused as unsupported here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from services.gateway.declarative.schema import (
    MISSING,
    UNSUPPORTED,
    Array,
    Problems,
    Record,
    String,
    is_reference,
    join,
)

_ENV_REFERENCE = re.compile(r"^\{vault://env/([A-Za-z0-9_-]+)\}$")


def env_name(resource: str) -> str:
    """The environment variable Kong's env vault reads for a resource."""
    return resource.replace("-", "_").upper()


def resolve_reference(reference: str, environ: Mapping[str, str], path: str, problems: Problems) -> Any:
    if not reference.startswith("{vault://env/"):
        vault = reference[len("{vault://"):].split("/", 1)[0]
        problems.add(path, f"{UNSUPPORTED}: vault '{vault}' (only the env vault is served)")
        return MISSING
    match = _ENV_REFERENCE.fullmatch(reference)
    if match is None:
        problems.add(path, f"{UNSUPPORTED}: {reference} (only {{vault://env/<name>}} is served)")
        return MISSING
    name = env_name(match.group(1))
    value = environ.get(name)
    if not value:
        problems.add(path, f"could not resolve reference {reference}: environment variable {name} is not set")
        return MISSING
    return value


def resolve_references(schema: Record, record: dict, path: str, environ: Mapping[str, str],
                       problems: Problems) -> dict:
    """`record` (validated against `schema`) with every vault reference replaced by its value."""
    resolved = dict(record)
    for name, spec in schema.fields.items():
        value = record.get(name)
        where = join(path, name)
        if isinstance(spec, String) and spec.referenceable and is_reference(value):
            secret = resolve_reference(value, environ, where, problems)
            if secret is not MISSING:
                literal = String(**{**vars(spec), "referenceable": False})
                if literal.validate(secret, where, problems) is not MISSING:
                    resolved[name] = secret
        elif isinstance(spec, Record) and isinstance(value, dict):
            resolved[name] = resolve_references(spec, value, where, environ, problems)
        elif isinstance(spec, Array) and isinstance(spec.elements, String) and spec.elements.referenceable \
                and isinstance(value, list):
            items = []
            for i, item in enumerate(value):
                items.append(resolve_reference(item, environ, join(where, i), problems)
                             if is_reference(item) else item)
            resolved[name] = items
    return resolved
