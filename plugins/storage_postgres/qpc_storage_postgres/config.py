"""The ``[postgres]`` config table (selected with ``storage = "postgres"``)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class PostgresConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # libpq-style URL, e.g. postgresql://qpc:secret@db.internal:5432/qpc.  QPC_POSTGRES_DSN
    # (environment) takes precedence, so the password need not be in the config file.
    dsn: SecretStr | None = None
    # Every table, index and function lives in this schema (created if missing).
    schema_name: str = Field(default="qpc", alias="schema")
    pool_min: int = Field(default=2, ge=1)
    pool_max: int = Field(default=16, ge=1)
    # Seconds a statement may take before the call fails with a storage error.
    command_timeout_secs: float = Field(default=30.0, gt=0)
    # Seconds to wait for the database at start-up (it may start after qpc).
    connect_timeout_secs: float = Field(default=30.0, gt=0)

    @field_validator("schema_name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", v):
            raise ValueError("must be a lower-case SQL identifier (letters, digits, _)")
        return v
