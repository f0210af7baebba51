"""The ``[kt_log]`` config table."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class KtLogConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # AuditKeyTransparency (520) never returns more entries than this in one page.
    max_audit_page: int = Field(default=1000, ge=1, le=10_000)
    # A signed tree head older than this is re-signed (same size and root, fresh timestamp)
    # when next served, so idle logs still hand out recent heads.
    sth_max_age_secs: float = Field(default=300.0, gt=0)
    # Append a binding the directory serves but the log has not recorded yet (users created
    # before the plugin was enabled, or whose on_user_registered append failed) when it is
    # first resolved or revoked, so that everything ResolveUser returns is in the log.
    log_on_resolve: bool = True
    # Stored Merkle nodes never change; this many recently read ones are kept in memory
    # (about 250 bytes each).  0 disables the cache: every proof then reads all its nodes.
    node_cache_size: int = Field(default=16_384, ge=0)
    # Deprecated, no effect (kept so existing files still load; a warning says to remove
    # it): earlier versions let only one server sharing a store run kt_log.
    sole_writer: bool = False
