"""Who may do what: API keys with scopes, read from ``--api-keys-file``.

One key per line, then optional scopes, each ``ACTION=GLOB[,GLOB...]`` over adapter names
(``fnmatch`` globs: ``*``, ``?``)::

    # key                 scopes
    k-team-a-5f1c         use=pets,pets-* admin=pets-*
    k-ci-9b2e             upload=ci-* alias=ci-*
    k-everyone-77d0       # no scopes: every adapter, no admin

Actions: ``use`` (classify, chat, listings), ``upload``, ``alias``, ``delete``; ``admin`` is
all three admin actions. A key may use what it may administer. A key without scopes uses
every adapter and administers none. The admin token has every right.

A caller never learns about an adapter outside its scope: it is absent from listings and a
404 to every route, exactly like a name nobody stored; an admin action on a name it may
see but not administer is a 403 that names only that name.

The caller's rights travel in a context variable set by the API-key middleware for the
request's task, so the registry checks them where a reference is resolved, whatever route
(classify, chat, OpenAI ``model``) it came from; without keys it stays ``None``, i.e. no
restriction.
"""

from __future__ import annotations

import hashlib
import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

Action = Literal["use", "upload", "alias", "delete"]
ADMIN_ACTIONS: tuple[Action, ...] = ("upload", "alias", "delete")
_GLOB = re.compile(r"[a-z0-9._*?-]{1,64}")


@dataclass(frozen=True)
class Access:
    """What one caller may do: globs of adapter names per action, or everything."""

    scopes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    full: bool = False

    def may(self, action: Action, name: str) -> bool:
        if self.full:
            return True
        actions: tuple[str, ...] = ("use", *ADMIN_ACTIONS) if action == "use" else (action,)
        return any(fnmatchcase(name, glob) for a in actions for glob in self.scopes.get(a, ()))

    def may_see(self, name: str) -> bool:
        return self.may("use", name)

    @property
    def administers(self) -> bool:
        return self.full or any(self.scopes.get(a) for a in ADMIN_ACTIONS)


FULL = Access(full=True)
UNSCOPED = Access({"use": ("*",)})
NOBODY = Access()  # no valid credentials: sees no adapter

# The rights of the request being served; None when API keys are off (no restriction).
CALLER: ContextVar[Access | None] = ContextVar("promptswap_caller", default=None)


def caller_may_see(name: str) -> bool:
    access = CALLER.get()
    return access is None or access.may_see(name)


@dataclass(frozen=True)
class ApiKey:
    digest: bytes  # sha256 of the key: the key itself is not kept
    access: Access


def load_api_keys(path: Path) -> list[ApiKey]:
    """Keys and their scopes from ``path`` (see the module docstring).

    Raises ``ValueError`` (with a message that never quotes a key, only line numbers) when
    the file cannot be read, holds no key, or a line does not parse: a configured but
    empty file would lock every client out, and a scope typo would grant the wrong rights.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the API keys file {str(path)!r}: {exc}") from None
    keys: list[ApiKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        secret, scopes = fields[0], fields[1:]
        comment = next((i for i, f in enumerate(scopes) if f.startswith("#")), len(scopes))
        scopes = scopes[:comment]
        keys.append(ApiKey(hashlib.sha256(secret.encode()).digest(), _parse_scopes(scopes, path, number)))
    if not keys:
        raise ValueError(f"the API keys file {str(path)!r} holds no key")
    if len({k.digest for k in keys}) != len(keys):
        raise ValueError(f"the API keys file {str(path)!r} lists a key twice")
    return keys


def _parse_scopes(fields: list[str], path: Path, number: int) -> Access:
    if not fields:
        return UNSCOPED
    scopes: dict[str, tuple[str, ...]] = {}
    where = f"the API keys file {str(path)!r}, line {number}"
    for item in fields:
        action, sep, globs = item.partition("=")
        if not sep or action not in ("use", "admin", *ADMIN_ACTIONS):
            raise ValueError(
                f"{where}: a scope is ACTION=GLOB[,GLOB...] with ACTION one of use, upload, alias, "
                "delete, admin (the key is the line's first word; keys hold no spaces)"
            )
        parsed = tuple(globs.split(","))
        if not all(_GLOB.fullmatch(g) for g in parsed):
            raise ValueError(
                f"{where}: {action}= takes adapter-name globs of a-z, 0-9, '.', '_', '-', '*', '?'"
            )
        for a in ADMIN_ACTIONS if action == "admin" else (action,):
            scopes[a] = (*scopes.get(a, ()), *parsed)
    return Access(scopes)
