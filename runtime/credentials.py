"""Which environment variables of a process tree look like credentials, by name.

A snapshot holds its server's memory, and so the environment every process of the tree was
started with (HF_TOKEN=..., AWS_SECRET_ACCESS_KEY=...): the values are in the page images. The
snapshot records the NAMES of those that look like credentials (never a value), read from
/proc/PID/environ at snapshot time, so `fastvllm inspect` can say what an image holds. Only the
environment a process started with is seen; a secret it read from a file or set later is in
its memory too, unnamed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from fastvllm.runtime import control_guard

# Words of a variable's name (split at '_') that mark a credential: HF_TOKEN, OPENAI_API_KEY,
# AWS_SECRET_ACCESS_KEY, DB_PASSWORD, GOOGLE_APPLICATION_CREDENTIALS, BASIC_AUTH...
_WORDS = {
    "TOKEN",
    "TOKENS",
    "SECRET",
    "SECRETS",
    "PASSWORD",
    "PASSWD",
    "PASSPHRASE",
    "KEY",
    "APIKEY",
    "CREDENTIAL",
    "CREDENTIALS",
    "CREDS",
    "AUTH",
    "COOKIE",
}
# Whole-name prefixes of credential families (AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN...).
_PREFIXES = ("AWS_",)
# Known not to be secrets although they match (a socket path, a region, a profile's name), and
# fastvllm's own per-server control token (runtime.control_guard), which every server it
# launches has and which its manifest holds anyway.
_NOT = {
    "SSH_AUTH_SOCK",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_CA_BUNDLE",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_OUTPUT",
    control_guard.TOKEN_ENV,
}
# A URL with a password in it (https://user:pass@host), whatever the variable is called.
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)


def looks_like_credential(name: str, value: str = "") -> bool:
    """Whether the variable `name` (with `value`, which is only looked at, never kept) probably
    holds a credential."""
    upper = name.upper()
    if upper in _NOT:
        return False
    if upper.startswith(_PREFIXES):
        return True
    if _WORDS & set(upper.split("_")):
        return True
    return bool(_URL_PASSWORD.search(value))


def credential_names(env: Mapping[str, str]) -> list[str]:
    return sorted(k for k, v in env.items() if looks_like_credential(k, v))


def environ_of(pid: int) -> dict[str, str]:
    """The environment `pid` was started with ({} if it cannot be read)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        name, eq, value = item.partition(b"=")
        if eq and name:
            out[name.decode(errors="replace")] = value.decode(errors="replace")
    return out


def tree_credential_names(pids: Iterable[int]) -> list[str]:
    """The credential-looking variable names in the environment of any of `pids`."""
    names: set[str] = set()
    for pid in pids:
        names.update(credential_names(environ_of(pid)))
    return sorted(names)


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` fit to show: credential-looking values replaced by ***."""
    return {k: ("***" if looks_like_credential(k, v) else v) for k, v in env.items()}
