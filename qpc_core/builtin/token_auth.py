"""Built-in plugin ``token_auth``: the static operator bearer token (``auth_token``).

The token authenticates a connection but proves no identity: the client must still run
AuthChallenge + ProveIdentity to act as an Ed25519 identity.  Unset ``auth_token`` to turn
operator-token access off.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from qpc_core.hookspecs import hookimpl
from qpc_core.rpc import AuthResult, PeerInfo

if TYPE_CHECKING:
    from qpc_core.app import App

KIND = "operator-token"


@hookimpl
async def authenticate(app: App, token: bytes, peer: PeerInfo) -> AuthResult | None:
    expected = app.settings.auth_token_value()
    if not expected:
        return None
    if hmac.compare_digest(token, expected.encode()):
        return AuthResult(kind=KIND)
    return None
