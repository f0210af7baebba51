"""The client state file: the Ed25519 identity key, pinned server keys, session tokens.

JSON, written atomically with mode 0600.  The identity key is created on first use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from qpc_core.identity import public_bytes


@dataclass
class ClientState:
    path: Path
    identity: Ed25519PrivateKey
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def identity_key(self) -> bytes:
        return public_bytes(self.identity)

    @classmethod
    def load_or_create(cls, path: Path) -> ClientState:
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["identity_seed"]))
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"qpc-client: state file {path} is unreadable: {e}") from None
            return cls(path, key, dict(data.get("servers", {})))
        state = cls(path, Ed25519PrivateKey.generate())
        state.save()
        return state

    def save(self) -> None:
        seed = self.identity.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        data = {
            "version": 1,
            "identity_seed": seed.hex(),
            "identity_key": self.identity_key.hex(),
            "servers": self.servers,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _server(self, server: str) -> dict[str, Any]:
        return self.servers.setdefault(server, {})

    def server_key(self, server: str) -> bytes | None:
        k = self.servers.get(server, {}).get("signing_key")
        return bytes.fromhex(k) if k else None

    def pin_server_key(self, server: str, key: bytes) -> None:
        self._server(server)["signing_key"] = key.hex()

    def session_token(self, server: str) -> str | None:
        tok: str | None = self.servers.get(server, {}).get("session_token")
        return tok

    def set_session(self, server: str, token: str | None, expires_at: int = 0) -> None:
        s = self._server(server)
        if token is None:
            s.pop("session_token", None)
            s.pop("session_expires_at", None)
        else:
            s["session_token"] = token
            s["session_expires_at"] = expires_at
