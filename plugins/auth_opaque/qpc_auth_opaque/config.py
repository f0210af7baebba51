"""The ``[auth_opaque]`` config table."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OpaqueConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Key stretching: clients must use the same parameters (they run the KSF).
    ksf: Literal["argon2id", "identity"] = "argon2id"
    argon2_memory_kib: int = Field(default=19456, ge=8)
    argon2_iterations: int = Field(default=2, ge=1)
    argon2_parallelism: int = Field(default=1, ge=1)
    context: str = "qpc-opaque-v1"
    server_identity: str = ""  # empty: the server's OPAQUE public key (RFC 9807 default)

    registration_open: bool = True
    session_lifetime_secs: int = Field(default=30 * 86400, gt=0)
    pending_login_ttl_secs: float = Field(default=60.0, gt=0)
    max_pending_logins: int = Field(default=10_000, gt=0)
    # Logins in progress from one client IP (a flood from one address cannot push other
    # users' logins out of the table above).
    max_pending_logins_per_ip: int = Field(default=64, gt=0)

    # Brute-force defence: this many failures are free inside the window, then every further
    # failure doubles a lock-out starting at backoff_base_secs (capped at backoff_max_secs).
    user_free_failures: int = Field(default=5, ge=0)
    ip_free_failures: int = Field(default=20, ge=0)
    failure_window_secs: float = Field(default=900.0, gt=0)
    backoff_base_secs: float = Field(default=2.0, gt=0)
    backoff_max_secs: float = Field(default=900.0, gt=0)
