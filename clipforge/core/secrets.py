"""Credentials in ``storage.options``: only as ``${ENV_VAR}`` references, resolved when a store opens.

A recipe is logged to MLflow (``recipe.yaml``), saved beside every run (``run.json``) and
passed to Prefect as a flow parameter, so it must never hold a secret. Options that name a
credential must be a reference such as ``secret: ${AWS_SECRET_ACCESS_KEY}``; the value is
read from the environment only when the :class:`~clipforge.core.storage.Store` is built,
and only the store keeps it.
"""

from __future__ import annotations

import os
import re
from typing import Any

from clipforge.core.errors import ConfigError

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# fsspec/s3fs/botocore option names that carry credentials (compared lower-case, at any depth)
CREDENTIAL_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "access_key",
        "secret_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "client_secret",
    }
)


def clear_text_credentials(options: Any, path: str = "storage.options") -> list[str]:
    """The paths of credential options whose value is not exactly one ``${ENV_VAR}`` reference."""
    found: list[str] = []
    if isinstance(options, dict):
        for key, value in options.items():
            sub = f"{path}.{key}"
            if str(key).lower() in CREDENTIAL_KEYS and not (isinstance(value, str) and _REF.fullmatch(value)):
                found.append(sub)
            else:
                found += clear_text_credentials(value, sub)
    elif isinstance(options, list):
        for i, value in enumerate(options):
            found += clear_text_credentials(value, f"{path}.{i}")
    return found


def resolve_env_refs(options: Any, path: str = "storage.options") -> Any:
    """``options`` with every ``${ENV_VAR}`` in its strings replaced by the variable's value."""
    if isinstance(options, dict):
        return {k: resolve_env_refs(v, f"{path}.{k}") for k, v in options.items()}
    if isinstance(options, list):
        return [resolve_env_refs(v, f"{path}.{i}") for i, v in enumerate(options)]
    if not isinstance(options, str):
        return options

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{path} refers to ${{{name}}}, but the environment variable {name} is not set")
        return os.environ[name]

    return _REF.sub(value, options)
