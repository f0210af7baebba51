"""Public core API for plugins: the username ↔ identity-key directory and server keys.

Auth plugins fill the directory with :func:`register_user`; everything else reads it with
:func:`resolve_username` / :func:`resolve_identity`.
"""

from __future__ import annotations

import re
import time
import unicodedata
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from qpc_core.errors import BadRequest, Conflict
from qpc_core.identity import check_identity_key
from qpc_core.storage.base import AlreadyExists, UserRecord

if TYPE_CHECKING:
    from qpc_core.app import App

USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,31}$")
CORE_KV = "core"


#: Longest input :func:`normalize_username` looks at: NFKC can grow a string 18-fold, so an
#: unchecked multi-megabyte name cost seconds of event-loop time before being refused.
MAX_USERNAME_INPUT = 128


def _plain(username: str) -> str:
    """How every reading of a name starts: the length guard, then NFKC, trimmed, lower
    case, without the clients' ``@`` prefix."""
    if len(username) > MAX_USERNAME_INPUT:
        raise BadRequest(f"username must be 2-32 characters (got {len(username)})")
    return unicodedata.normalize("NFKC", username).strip().lower().lstrip("@")


def split_qualified(username: str) -> tuple[str, str] | None:
    """``name@domain`` (a user of another server, federation) as ``(name, domain)``; None
    for a local name (``alice``, ``@alice``) or one with an empty side (``alice@``)."""
    local, at, domain = _plain(username).rpartition("@")
    domain = domain.strip().rstrip(".")
    return (local, domain) if at and local and domain else None


def normalize_username(username: str) -> str:
    """NFKC + lower case; 2-32 characters of ``a-z 0-9 . _ -`` starting with a letter/digit."""
    name = _plain(username)
    if not USERNAME_RE.match(name):
        raise BadRequest(
            "username must be 2-32 characters of a-z, 0-9, '.', '_', '-' and start with a "
            "letter or digit"
        )
    return name


async def register_user(app: App, username: str, identity_key: bytes) -> str:
    """Bind ``username`` → ``identity_key``; ``CONFLICT`` when either is taken.

    Fires ``on_user_registered`` (awaited) after the binding is committed."""
    name = normalize_username(username)
    check_identity_key(identity_key)
    try:
        await app.storage.create_user(name, identity_key, now=time.time())
    except AlreadyExists:
        raise Conflict(f"username '{name}' or this identity key is already registered") from None
    await app.hooks.on_user_registered(app, name, identity_key)
    return name


async def resolve_username(app: App, username: str) -> UserRecord | None:
    try:
        name = normalize_username(username)
    except BadRequest:
        return None
    return await app.storage.get_user_by_name(name)


async def resolve_identity(app: App, identity_key: bytes) -> UserRecord | None:
    return await app.storage.get_user_by_identity(identity_key)


async def server_key(app: App, name: str) -> Ed25519PrivateKey:
    """A persistent Ed25519 key of the server (created once, stored encrypted in the DB)."""
    cache: dict[str, Ed25519PrivateKey] = app.state.setdefault("server_keys", {})
    key = cache.get(name)
    if key is None:
        fresh = Ed25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()
        )
        raw = await app.storage.kv_put_if_absent(CORE_KV, f"ed25519:{name}".encode(), fresh)
        key = cache[name] = Ed25519PrivateKey.from_private_bytes(raw)
    return key
