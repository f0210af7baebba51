"""The ``[blobs]`` config table."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

KIB = 1024
MIB = 1024 * KIB

# The smallest charge against the quota for one blob (or unfinished upload): each blob costs
# at least a file system block for its content, plus its sidecar and directory entries.
MIN_CHARGE_BYTES = 4 * KIB

# A chunk must fit in one frame together with the rest of its message (hash, offsets, MIME
# type, Auth field): the protocol maximum is 4 MiB, so keep 4 KiB for everything else.
FRAME_OVERHEAD = 4 * KIB
MAX_CHUNK_LIMIT = 4 * MIB - FRAME_OVERHEAD


class BlobsConfig(BaseModel):
    """Limits and housekeeping of the blob store (all sizes in bytes)."""

    model_config = ConfigDict(extra="forbid")

    max_blob_bytes: int = Field(default=50_000_000, gt=0)
    """Largest blob accepted (``total_size``); larger uploads fail with TOO_LARGE."""

    quota_bytes_per_identity: int = Field(default=1024 * MIB, ge=0)
    """Bytes one identity may hold: every blob it uploaded (each counted once, also when the
    content was already stored) plus the full ``total_size`` of its unfinished uploads.
    Each blob and unfinished upload counts at least ``MIN_CHARGE_BYTES`` (4 KiB), what it
    costs on disk at the least.  ``0`` disables the quota."""

    max_blobs_per_identity: int = Field(default=100_000, ge=0)
    """Blobs one identity may hold, unfinished uploads included (each blob is two files on
    disk).  ``0`` disables the limit."""

    max_partial_uploads_per_identity: int = Field(default=16, gt=0)
    """Unfinished uploads one identity may have at a time (each holds a file and a record)."""

    partial_ttl_secs: float = Field(default=86_400.0, gt=0)
    """An unfinished upload with no new bytes for this long is deleted by the collector."""

    gc_interval_secs: float = Field(default=600.0, gt=0)
    """How often the background collector looks for abandoned uploads and stray files."""

    max_chunk_bytes: int = Field(default=1 * MIB, ge=1 * KIB, le=MAX_CHUNK_LIMIT)
    """Largest ``chunk`` accepted by UploadBlob and largest one DownloadBlob returns."""

    download_chunk_bytes: int = Field(default=256 * KIB, ge=1 * KIB, le=MAX_CHUNK_LIMIT)
    """What DownloadBlob returns when the request's ``length`` is 0."""

    reorder_wait_secs: float = Field(default=10.0, ge=0)
    """A chunk that arrives ahead of ``received`` (pipelined uploads can overtake each other
    on parallel streams) waits this long for the missing bytes before failing BAD_REQUEST."""

    reorder_window_bytes: int = Field(default=16 * MIB, ge=0)
    """Chunks further ahead of ``received`` than this fail BAD_REQUEST at once."""

    sole_node: bool = False
    """On a store shared by several servers (``storage = "postgres"``) only one server may
    run blobs: the content lives in that server's ``data_dir/blobs`` and the locks that
    keep a blob from being deleted while another upload of the same content claims it are
    in its memory.  Set this on exactly that server and leave blobs out on the others;
    without it blobs refuses to start on a shared store."""
