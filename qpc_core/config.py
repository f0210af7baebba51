"""Server configuration: ``qpc-server.toml`` + ``QPC_*`` environment + CLI flags.

Precedence is CLI > environment > file > defaults.  Nested keys come from TOML tables or from
the environment with ``__`` (``QPC_FEDERATION__ENABLED=true``).  Tables that core does not
know belong to plugins: each plugin declares a model through ``register_config_sections`` and
its table is validated at start-up (and by ``qpc check-config``).

Every validation problem becomes one :class:`~qpc_core.errors.ConfigError` whose message names
the config path, e.g. ``federation.peers[0].address: expected host:port``.
"""

from __future__ import annotations

import difflib
import logging
import os
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from pydantic_settings.sources.utils import parse_env_vars

from qpc_core.errors import ConfigError

log = logging.getLogger("qpc.config")

DEFAULT_CONFIG_FILE = "qpc-server.toml"
DEV_AUTH_TOKEN = "devtoken"
ENV_PREFIX = "QPC_"
#: The client's environment variables share the prefix; the server ignores them.
CLIENT_ENV_PREFIX = "QPC_CLIENT_"


def parse_hostport(value: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises ValueError("expected host:port")."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("expected host:port")
    host, _, port_s = value.rpartition(":")
    host = host.strip("[]") or default_host
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError("expected host:port") from None
    if not 0 <= port <= 65535:
        raise ValueError("expected host:port with a port in 0-65535")
    return host, port


def _hostport(value: Any) -> str:
    parse_hostport(value)
    return str(value)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FederationPeer(_Section):
    domain: str
    address: str

    _addr = field_validator("address")(lambda v: _hostport(v))  # type: ignore[misc]


class FederationConfig(_Section):
    """``[federation]``: read by the ``federation`` plugin (``enabled = true`` without that
    plugin loaded is a start-up error).  Certificate paths are DER or PEM files."""

    enabled: bool = False
    domain: str = ""
    listen: str = "0.0.0.0:7001"
    federation_cert: Path | None = None
    federation_key: Path | None = None
    federation_ca: Path | None = None
    # The federation CA's certificate revocation list (qpc-federation-certs revoke): peers
    # whose certificates it names are refused; read again on SIGHUP.
    federation_crl: Path | None = None
    peers: list[FederationPeer] = Field(default_factory=list)
    # How long one relayed call to a peer may take before the client's call fails
    # (UNAVAILABLE, retryable).
    relay_timeout_secs: float = Field(default=10.0, gt=0, le=300)
    # How long "no peer hosts this identity key" is remembered (messages to such keys are
    # stored here meanwhile); 0 asks the peers for every message.
    route_cache_secs: float = Field(default=60.0, ge=0, le=86400)

    _listen = field_validator("listen")(lambda v: _hostport(v))  # type: ignore[misc]

    @model_validator(mode="after")
    def _complete(self) -> FederationConfig:
        self.domain = self.domain.strip().lower().rstrip(".")
        for p in self.peers:
            p.domain = p.domain.strip().lower().rstrip(".")
        if self.enabled:  # a disabled table is not held to these (it does nothing)
            seen: set[str] = set()
            for i, p in enumerate(self.peers):
                if not p.domain:
                    raise ValueError(f"peers[{i}].domain must not be empty")
                if p.domain in seen:
                    raise ValueError(f"peers[{i}].domain {p.domain!r} is listed twice")
                if p.domain == self.domain:
                    raise ValueError(f"peers[{i}].domain is this server's own domain")
                seen.add(p.domain)
            missing = [k for k in ("federation_cert", "federation_key", "federation_ca")
                       if getattr(self, k) is None]
            if not self.domain:
                missing.insert(0, "domain")
            if missing:
                raise ValueError(
                    "enabled = true needs " + ", ".join(missing) + " (see docs/operations: "
                    "Federation; `qpc-federation-certs` makes a CA and node certificates)"
                )
        return self


class RateLimit(_Section):
    """At most ``requests`` calls per ``window_secs`` sliding window, per identity and per IP."""

    requests: int = Field(gt=0)
    window_secs: float = Field(gt=0)


def default_rate_limits() -> dict[str, RateLimit]:
    return {
        "auth": RateLimit(requests=30, window_secs=60),
        "delivery": RateLimit(requests=6000, window_secs=60),
        "keys": RateLimit(requests=600, window_secs=60),
        "users": RateLimit(requests=600, window_secs=60),
        "blobs": RateLimit(requests=3000, window_secs=60),
        "default": RateLimit(requests=3000, window_secs=60),
        # Calls from federation peers (methods 900-905), counted per peer address only, so
        # the per-IP factor applies: a guard against a runaway peer, not a quota.
        "federation": RateLimit(requests=60000, window_secs=60),
    }


class Settings(BaseSettings):
    """All core settings.  Field names are the TOML keys and (upper-cased) the env names."""

    model_config = SettingsConfigDict(
        env_prefix="QPC_",
        env_nested_delimiter="__",
        extra="allow",
        validate_default=True,
    )

    production: bool = False
    listen: str = "0.0.0.0:7000"
    data_dir: Path = Path("data")
    db_path: Path | None = None
    db_key: SecretStr | None = None
    db_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL"
    # Pages; 0 (SQLite's "off") is refused: the WAL would then grow without bound.
    db_wal_autocheckpoint: int = Field(default=1000, ge=1)
    db_pool_size: int = Field(default=4, ge=1, le=64)
    storage: str = "sqlcipher"

    tls_cert: Path | None = None
    tls_key: Path | None = None

    auth_token: SecretStr | None = SecretStr(DEV_AUTH_TOKEN)
    admin_token: SecretStr | None = None

    metrics_listen: str = "0.0.0.0:9090"
    metrics_enabled: bool = True

    plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Transport (the scaling guide's "code change required" table, now config keys).
    max_idle_timeout_secs: float = Field(default=300.0, gt=0)
    keepalive_interval_secs: float = Field(default=30.0, ge=0)
    max_concurrent_bidi_streams: int = Field(default=128, ge=1)
    max_concurrent_uni_streams: int = Field(default=128, ge=1)
    max_connections: int = Field(default=10_000, ge=1)
    max_payload_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=4 * 1024 * 1024)
    drain_timeout_secs: float = Field(default=10.0, ge=0)
    # Transport abuse limits (docs/protocol.md "Limits and timers").
    # A connection whose TLS handshake has not completed after this long is dropped.
    handshake_timeout_secs: float = Field(default=10.0, gt=0)
    # A connection with neither a credential nor an identity after this long is closed.
    auth_timeout_secs: float = Field(default=30.0, gt=0)
    # A request frame whose first byte arrived this long ago and that is still incomplete
    # is refused (stream error).
    request_receive_timeout_secs: float = Field(default=30.0, gt=0)
    # Connections (established and mid-handshake) from one client IP address.
    max_connections_per_ip: int = Field(default=256, ge=1)
    # Per connection: payload bytes of requests still being received (announced lengths),
    # and the QUIC connection receive window of an authenticated connection.
    max_request_buffer_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024,
                                          le=1024 * 1024 * 1024)
    # Largest request payload on a connection that has not authenticated; unauthenticated
    # connections get a QUIC connection window of 4x this.
    max_unauthenticated_payload_bytes: int = Field(default=64 * 1024, ge=1024,
                                                   le=4 * 1024 * 1024)
    # QUIC Retry (address validation before any per-connection state): "auto" turns it on
    # while at least retry_half_open_threshold connections are mid-handshake.
    quic_retry: Literal["off", "on", "auto"] = "auto"
    retry_half_open_threshold: int = Field(default=128, ge=1)

    # Delivery.
    max_message_bytes: int = Field(default=1024 * 1024, ge=1, le=4 * 1024 * 1024)
    max_queue_depth: int = Field(default=100_000, ge=1)
    dedup_window_secs: int = Field(default=86_400, ge=0)
    max_fetch_wait_ms: int = Field(default=30_000, ge=0)
    expiry_interval_secs: float = Field(default=30.0, gt=0)
    group_commit_max_batch: int = Field(default=512, ge=1)

    rate_limits: dict[str, RateLimit] = Field(default_factory=default_rate_limits)
    # Per client IP the limit is this many times the per-identity one (NAT, shared hosts).
    rate_limit_ip_factor: float = Field(default=10.0, ge=1.0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # Audit log: one INFO line per answered RPC on logger "qpc.audit" (see docs/operations).
    audit_log: bool = False
    # In audit lines, identities and client IPs are keyed-hash tokens instead of the values.
    redact_logs: bool = True
    # "uvloop" needs `pip install 'qpc-core[fast]'`; the same qpc code runs on either loop.
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    # QUIC library: "qh3" (compiled packet engine) needs `pip install 'qpc-core[fast]'`.
    quic_backend: Literal["aioquic", "qh3"] = "aioquic"

    federation: FederationConfig = Field(default_factory=FederationConfig)

    _listen = field_validator("listen", "metrics_listen")(lambda v: _hostport(v))  # type: ignore[misc]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _whole_settings(self) -> Settings:
        # A key core does not know is a plugin's table; anything else is a mistake (a
        # misspelt `producton = true` used to run a development server, with a warning).
        for name, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                near = difflib.get_close_matches(name, list(type(self).model_fields), 1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise ValueError(
                    f"unknown setting '{name}'{hint}; plugin settings go in a [table]")
        if (self.tls_cert is None) != (self.tls_key is None):
            given = "tls_cert" if self.tls_cert is not None else "tls_key"
            raise ValueError(
                f"{given} is set but not its pair: set both tls_cert and tls_key, or neither "
                "(the development certificate)")
        return self

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("max_request_buffer_bytes", mode="after")
    @classmethod
    def _request_buffer_fits_payload(cls, v: int, info: ValidationInfo) -> int:
        payload = info.data.get("max_payload_bytes")
        if isinstance(payload, int) and v < payload:
            raise ValueError(
                f"must be at least max_payload_bytes ({payload}), or no request of the "
                "largest size could be received"
            )
        return v

    @field_validator("rate_limits", mode="after")
    @classmethod
    def _merge_rate_defaults(cls, v: dict[str, RateLimit]) -> dict[str, RateLimit]:
        merged = default_rate_limits()
        merged.update(v)
        return merged

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file layer arrives through init kwargs merged under the CLI (see load_config).
        return (init_settings, env_settings)

    # Derived paths -----------------------------------------------------------------------
    @property
    def resolved_db_path(self) -> Path:
        return self.db_path if self.db_path is not None else self.data_dir / "qpc.db"

    @property
    def plugin_tables(self) -> dict[str, Any]:
        """Top-level tables core does not know: plugin configuration, by plugin name."""
        return dict(self.model_extra or {})

    def auth_token_value(self) -> str | None:
        return self.auth_token.get_secret_value() if self.auth_token else None

    def production_problems(self) -> list[str]:
        """REFERENCE §10: what ``QPC_PRODUCTION=true`` refuses to start with."""
        problems = []
        tok = self.auth_token_value()
        if tok is not None and (len(tok) < 16 or tok == DEV_AUTH_TOKEN):
            problems.append(
                "auth_token: production requires at least 16 characters and not 'devtoken' "
                "(set QPC_AUTH_TOKEN, or unset it to disable the operator token)"
            )
        if self.storage == "sqlcipher" and (
            self.db_key is None or not self.db_key.get_secret_value()
        ):
            problems.append("db_key: production requires a database key (set QPC_DB_KEY)")
        if self.tls_cert is None or self.tls_key is None:
            problems.append("tls_cert/tls_key: production requires certificate files "
                            "(set QPC_TLS_CERT and QPC_TLS_KEY)")
        else:
            for name, p in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
                if not p.is_file():
                    problems.append(f"{name}: file not found: {p}")
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 16:
            problems.append("admin_token: production requires at least 16 characters")
        return problems


#: Core settings a running server applies when the configuration is read again (SIGHUP,
#: :meth:`App.reload_config`): each is read where it is used, or applied by the App (rate
#: limits, log level).  Every other core setting needs a restart.  Plugins add theirs with
#: the ``register_reloadable_settings`` hook.
CORE_RELOADABLE: frozenset[str] = frozenset({
    "rate_limits", "rate_limit_ip_factor", "log_level",
    "max_message_bytes", "max_queue_depth", "max_fetch_wait_ms", "dedup_window_secs",
    "auth_token", "admin_token", "drain_timeout_secs",
    # Read by every TLS listener when it reloads its certificate (after the configuration).
    "tls_cert", "tls_key",
})


@dataclass(frozen=True)
class ConfigReload:
    """What one configuration reload did (:meth:`App.reload_config`, hook
    ``on_config_reload``).  ``old``: the settings before it (``app.settings`` holds the new
    ones); ``applied``: the keys that took their new values; ``restart_pending``: keys whose
    value in the configuration differs from the running one until a restart (after a failed
    reload, those of the last successful one); ``error``: why the configuration was refused
    (nothing changed); ``at``: when it ran (unix seconds)."""

    old: Settings
    applied: tuple[str, ...] = ()
    restart_pending: tuple[str, ...] = ()
    error: str | None = None
    at: float = field(default_factory=time.time)

    def changed(self, prefix: str) -> bool:
        """Did a key of table ``prefix`` (e.g. ``"federation"``), or ``prefix`` itself,
        take a new value?  Never after a refused reload (nothing was applied)."""
        return any(k == prefix or k.startswith(prefix + ".") for k in self.applied)


def apply_log_level(level: str) -> None:
    """Set the server's log level (the root logger; aioquic's chatty ``quic`` logger stays
    at WARNING or above)."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("quic").setLevel(max(logging.WARNING, root.level))


def _unwrap(v: Any) -> Any:
    return v.get_secret_value() if isinstance(v, SecretStr) else v


def _differs(a: Any, b: Any) -> bool:
    return bool(_unwrap(a) != _unwrap(b))


def changed_settings(old: Settings, new: Settings) -> list[str]:
    """The config keys whose values differ between ``old`` and ``new``, dotted one level
    into tables (``federation.peers``, ``blobs.max_blob_bytes``); a core setting whose value
    is a mapping (``rate_limits``) counts as one key.  Sorted."""
    out: list[str] = []
    for name in type(old).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if isinstance(a, BaseModel) and isinstance(b, BaseModel):
            out += [f"{name}.{k}" for k in type(a).model_fields
                    if _differs(getattr(a, k), getattr(b, k))]
        elif _differs(a, b):
            out.append(name)
    ta, tb = old.plugin_tables, new.plugin_tables
    for table in ta.keys() | tb.keys():
        a, b = ta.get(table, {}), tb.get(table, {})
        if not isinstance(a, dict) or not isinstance(b, dict):
            if _differs(a, b):
                out.append(table)
            continue
        out += [f"{table}.{k}" for k in a.keys() | b.keys() if _differs(a.get(k), b.get(k))]
    return sorted(out)


def is_reloadable(key: str, reloadable: frozenset[str] | set[str]) -> bool:
    """``key`` (as :func:`changed_settings` names it) is applied live: it, or a table it
    is in, was declared reloadable."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in reloadable for i in range(1, len(parts) + 1))


def merge_settings(old: Settings, new: Settings, keys: Sequence[str]) -> Settings:
    """``old`` with the values of ``keys`` (as :func:`changed_settings` names them) taken
    from ``new``, validated again as a whole (a live value may not contradict a setting
    that keeps its old value until a restart).  Raises ConfigError."""
    data: dict[str, Any] = {name: getattr(old, name) for name in type(old).model_fields}
    data.update({k: dict(v) if isinstance(v, dict) else v
                 for k, v in old.plugin_tables.items()})
    new_tables = new.plugin_tables
    for key in keys:
        head, _, rest = key.partition(".")
        if head in type(old).model_fields:
            if rest:
                data[head] = data[head].model_copy(update={rest: getattr(getattr(new, head), rest)})
            else:
                data[head] = getattr(new, head)
        elif not rest or not isinstance(new_tables.get(head, {}), dict):
            if head in new_tables:
                data[head] = new_tables[head]
            else:
                data.pop(head, None)
        else:
            table = data.setdefault(head, {})
            if rest in new_tables.get(head, {}):
                table[rest] = new_tables[head][rest]
            else:
                table.pop(rest, None)
    dumped: dict[str, Any] = {k: (v.model_dump() if isinstance(v, BaseModel) else v)
                              for k, v in data.items()}
    try:
        return _FrozenSettings(**dumped)
    except ValidationError as e:
        raise validation_error_to_config_error(e) from None


def format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error_to_config_error(
    exc: ValidationError, prefix: str = ""
) -> ConfigError:
    lines = []
    for err in exc.errors():
        path = format_loc(err["loc"])
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"config: {path}: {msg}" if path else f"config: {msg}")
    return ConfigError("\n".join(lines))


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: {path}: not UTF-8 text (TOML files are UTF-8): {e}") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise ConfigError(f"config: {path}: cannot be read: {e.strerror or e}") from None


def load_config(
    path: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings` from file, environment and CLI ``overrides``.

    ``path`` None means ``./qpc-server.toml`` when it exists.  ``env`` defaults to
    ``os.environ`` (tests pass their own mapping).
    """
    file_data: dict[str, Any] = {}
    if path is None:
        if Path(DEFAULT_CONFIG_FILE).is_file():
            file_data = read_config_file(Path(DEFAULT_CONFIG_FILE))
    else:
        file_data = read_config_file(Path(path))
    environ = dict(os.environ if env is None else env)
    cli = {k: v for k, v in (overrides or {}).items() if v is not None}

    # Environment wins over the file: build env values with pydantic-settings' own env source
    # and lay them over the file; the CLI goes on top.
    env_values = _env_values(environ)
    merged = _deep_merge(_deep_merge(file_data, env_values), cli)
    try:
        return _FrozenSettings(**merged)
    except ValidationError as e:
        raise validation_error_to_config_error(e) from None


class _FrozenSettings(Settings):
    """Settings built only from explicit values (env already folded in by load_config)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' env parsing applied to an explicit mapping instead of os.environ."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, False, self.env_ignore_empty, self.env_parse_none_str)


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """Read ``QPC_*`` variables (JSON for complex values, ``__`` for nesting)."""
    try:
        values = _MappingEnvSource(environ)()
    except SettingsError as e:
        raise ConfigError(f"config: environment: {e} (complex values must be JSON)") from None
    out: dict[str, Any] = {k: v for k, v in values.items() if k in Settings.model_fields}
    # Plugin tables: QPC_<TABLE>__<KEY>[__<KEY>...] (values as strings; the plugin's model
    # converts them).  Other unknown QPC_ variables are ignored with a warning (the client's
    # own QPC_CLIENT_* share the prefix).
    for name, raw in environ.items():
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper.startswith(CLIENT_ENV_PREFIX):
            continue
        parts = [p.lower() for p in upper[len(ENV_PREFIX):].split("__")]
        if parts[0] in Settings.model_fields:
            continue
        if len(parts) < 2 or not all(parts):
            # Other tools and plugins have QPC_ variables of their own (QPC_POSTGRES_DSN,
            # the client's QPC_PASSWORD ...): only a near miss of a setting is reported.
            near = difflib.get_close_matches(parts[0], list(Settings.model_fields), 1, 0.85)
            if near:
                log.warning("config: environment variable %s is not a qpc setting (did you "
                            "mean QPC_%s?); ignored", name, near[0].upper())
            continue
        node = out.setdefault(parts[0], {})
        if not isinstance(node, dict):
            continue
        for part in parts[1:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = raw
    return out


__all__ = [
    "CORE_RELOADABLE",
    "DEFAULT_CONFIG_FILE",
    "DEV_AUTH_TOKEN",
    "ConfigReload",
    "FederationConfig",
    "FederationPeer",
    "RateLimit",
    "Settings",
    "apply_log_level",
    "changed_settings",
    "format_loc",
    "is_reloadable",
    "load_config",
    "merge_settings",
    "parse_hostport",
    "read_config_file",
    "validation_error_to_config_error",
]
