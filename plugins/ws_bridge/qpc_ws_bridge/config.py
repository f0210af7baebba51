"""The ``[ws_bridge]`` config table."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator

from qpc_core.config import parse_hostport


class WsBridgeConfig(BaseModel):
    """Where the bridge listens and whom it lets in.  Every other limit (payload sizes, calls
    in flight per connection, auth deadline, per-IP connections, rate limits) is the
    server's own, the same as on the QUIC port."""

    model_config = ConfigDict(extra="forbid")

    listen: str = "127.0.0.1:7002"
    """host:port of the WebSocket listener.  Loopback by default: the usual deployment puts
    a TLS-terminating reverse proxy (nginx, Caddy) in front; set ``tls = true`` to serve
    ``wss://`` directly."""

    path: str = "/v1/ws"
    """URL path of the WebSocket endpoint."""

    tls: bool = False
    """Serve ``wss://`` with the server's certificate (``tls_cert``/``tls_key``)."""

    public_hosts: list[str] = Field(default_factory=list)
    """``Host`` values (``name`` or ``name:port``, as in the browser's URL) the bridge answers
    to; other hosts are refused (HTTP 421), which also defeats DNS rebinding.  Identity proofs
    on the bridge are bound to the host the browser connected to.  Required in production."""

    allowed_origins: list[str] | None = None
    """Web origins (``https://chat.example.org``) whose pages may connect; requests without an
    ``Origin`` header (non-browser clients) are always allowed.  Unset: any origin."""

    trusted_proxies: list[str] = Field(default_factory=list)
    """Addresses or networks (CIDR) of reverse proxies whose ``X-Forwarded-For`` is believed:
    the client address used for per-IP limits and logs is then the last address in that
    header that is not itself a trusted proxy."""

    max_connections: int = Field(default=10_000, ge=1)
    """WebSocket connections at once (upgrades beyond are refused with HTTP 503)."""

    serve_client_js: bool = True
    """Serve the browser client library at ``<path>/qpc.js``."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or "?" in v or "#" in v:
            raise ValueError("must be a URL path starting with '/'")
        return v.rstrip("/") or "/"

    @field_validator("public_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        """As browsers send ``Host``: lower case; a default port (80, 443) left out."""
        out = []
        for h in v:
            h = h.strip().lower()
            if not h or "/" in h or " " in h or "@" in h:
                raise ValueError(f"{h!r} is not a host or host:port")
            out.append(h.removesuffix(":80").removesuffix(":443"))
        return out

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str] | None) -> list[str] | None:
        """As browsers send ``Origin``: lower case, no default port, no path."""
        if v is None:
            return None
        out = []
        for o in v:
            o = o.strip().lower()
            scheme, sep, host = o.partition("://")
            if scheme not in ("http", "https") or not sep or not host or "/" in host:
                raise ValueError(f"{o!r} is not an origin (scheme://host[:port], no path)")
            default = ":80" if scheme == "http" else ":443"
            out.append(f"{scheme}://{host.removesuffix(default)}")
        return out

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                raise ValueError(f"{p!r} is not an IP address or network") from None
        return v
