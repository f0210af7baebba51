"""Audit log: one line per answered RPC on the ``qpc.audit`` logger (REFERENCE §10).

Off by default (``audit_log``).  Each line names the method, its status, the time taken, the
connection's identity and the client IP.  With ``redact_logs`` (the default) identities and
IPs are written as ``h:`` plus 16 hex digits of HMAC-SHA256 under a per-server key kept in the
encrypted database: the same identity or IP always gets the same token on this server, so an
operator can follow one client through the log, but the log alone cannot be matched against
the (public) user directory or the IPv4 address space, which a plain SHA-256 could.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from typing import TYPE_CHECKING

from qpc_core.framing import Status
from qpc_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from qpc_core.app import App
    from qpc_core.rpc import Connection

log = logging.getLogger("qpc.audit")

KEY_NAMESPACE = "audit"
KEY_NAME = b"redaction-key"


LINE = "rpc method=%s id=%d status=%s ms=%.2f identity=%s peer=%s conn=%d"
#: Tokens remembered (identities and IPs recur on every call of a connection).
TOKEN_CACHE = 10_000


class AuditLog:
    """Formats and writes audit lines; ``key`` is None when identities are logged in clear."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key
        self._tokens: dict[bytes, str] = {}

    def token(self, value: bytes) -> str:
        if self.key is None:
            return value.hex()
        t = self._tokens.get(value)
        if t is None:
            if len(self._tokens) >= TOKEN_CACHE:
                self._tokens.clear()
            t = self._tokens[value] = (
                "h:" + hmac.new(self.key, value, hashlib.sha256).hexdigest()[:16]
            )
        return t

    def rpc(self, conn: Connection, method_id: int, method: str, status: int,
            seconds: float) -> None:
        identity = conn.identity_key
        if identity is None and conn.auth is not None:
            identity = conn.auth.identity_key
        who = self.token(identity) if identity else "-"
        host = conn.peer.host
        peer = host if self.key is None else self.token(host.encode())
        try:
            status_name = Status(status).name
        except ValueError:
            status_name = str(status)
        if log.isEnabledFor(logging.INFO):
            # Built directly: Logger.info would also walk the stack for the caller's file and
            # line (a fifth of the cost of a line here), which an audit record does not need.
            args = (method, method_id, status_name, seconds * 1000.0, who, peer,
                    conn.connection_id)
            log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, LINE, args, None))


def get(app: App) -> AuditLog | None:
    audit: AuditLog | None = app.state.get("audit")
    return audit


@hookimpl
async def startup(app: App) -> None:
    s = app.settings
    if not s.audit_log:
        return
    key = None
    if s.redact_logs:
        key = await app.storage.kv_put_if_absent(KEY_NAMESPACE, KEY_NAME, os.urandom(32))
    app.state["audit"] = AuditLog(key)
    log.info("audit log on (identities and IPs %s)",
             "redacted with a per-server HMAC key" if key else "in clear: redact_logs = false")
