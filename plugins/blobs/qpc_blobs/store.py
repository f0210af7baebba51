"""The on-disk blob store: plain blocking file operations, run in worker threads.

Layout under the root (``<data_dir>/blobs``)::

    ab/abcdef…(64 hex)        a complete blob: exactly the bytes whose SHA-256 is its name
    ab/abcdef….json           its sidecar: {"size", "sha256", "mime_type", "created_at"}
    partial/<64 hex>.part     an unfinished upload; the name is SHA-256(tag || identity ||
                              blob hash) so identities do not appear on disk
    *.tmp                     a file being written (removed at start-up and by the collector)

**A blob is complete if and only if its file exists under its final name.** That file only
ever appears through ``os.replace`` of a fully written, fsynced, hash-verified partial file,
after the sidecar has been written (temporary file, fsync, rename) and before the directory
is fsynced (and the root too when the commit created the blob's ``ab/`` directory, so that the
directory entry is durable as well). A crash at any point leaves either no blob or a complete
one: never a blob that claims to be complete without being so. A sidecar without its blob is
ignored (and collected).

Nothing here imports asyncio: the service awaits these functions through
``asyncio.to_thread`` so disk I/O never blocks the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PARTIAL_DIR = "partial"
PARTIAL_SUFFIX = ".part"
SIDECAR_SUFFIX = ".json"
TMP_SUFFIX = ".tmp"
DEFAULT_MIME = "application/octet-stream"
_PARTIAL_TAG = b"qpc-blobs partial v1\x00"
_READ_BLOCK = 1024 * 1024
_PREFIX_DIR = re.compile(r"[0-9a-f]{2}")
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")


class Hasher(Protocol):
    """The subset of a ``hashlib`` object the store uses (SHA-256)."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class BlobMeta:
    """The sidecar of a complete blob."""

    size: int
    mime_type: str
    created_at: float

    def to_json(self, blob_hash: bytes) -> bytes:
        return json.dumps({
            "sha256": blob_hash.hex(), "size": self.size, "mime_type": self.mime_type,
            "created_at": self.created_at,
        }, sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class PartialFile:
    name: str
    size: int
    mtime: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


class BlobStore:
    """Files of complete blobs and of unfinished uploads under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.partial_dir = root / PARTIAL_DIR
        self._mkdir_lock = threading.Lock()  # a new ab/ directory is durable before it is used

    # -- names -----------------------------------------------------------------------------
    def blob_path(self, blob_hash: bytes) -> Path:
        h = blob_hash.hex()
        return self.root / h[:2] / h

    def sidecar_path(self, blob_hash: bytes) -> Path:
        h = blob_hash.hex()
        return self.root / h[:2] / (h + SIDECAR_SUFFIX)

    @staticmethod
    def partial_name(identity_key: bytes, blob_hash: bytes) -> str:
        return hashlib.sha256(_PARTIAL_TAG + identity_key + blob_hash).hexdigest()

    def partial_path(self, identity_key: bytes, blob_hash: bytes) -> Path:
        return self.partial_dir / (self.partial_name(identity_key, blob_hash) + PARTIAL_SUFFIX)

    # -- start-up --------------------------------------------------------------------------
    def setup(self) -> int:
        """Create the directories and remove temporary files a crash left; return how many."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        _fsync_dir(self.root)
        _fsync_dir(self.root.parent)
        removed = 0
        for tmp in self.root.glob("**/*" + TMP_SUFFIX):
            removed += _unlink(tmp)
        return removed

    # -- complete blobs --------------------------------------------------------------------
    def read_meta(self, blob_hash: bytes) -> BlobMeta | None:
        """The metadata of a complete blob, ``None`` when there is no such blob."""
        try:
            size = self.blob_path(blob_hash).stat().st_size
        except FileNotFoundError:
            return None
        mime, created = DEFAULT_MIME, 0.0
        try:
            raw: dict[str, Any] = json.loads(self.sidecar_path(blob_hash).read_bytes())
            mime = str(raw.get("mime_type") or DEFAULT_MIME)
            created = float(raw.get("created_at") or 0.0)
        except (OSError, ValueError):
            pass  # the blob file is the truth; its sidecar only adds the MIME type
        return BlobMeta(size=size, mime_type=mime, created_at=created)

    def read_range(self, blob_hash: bytes, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (FileNotFoundError if the blob is gone)."""
        fd = os.open(self.blob_path(blob_hash), os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
            if len(data) == length or not data:
                return data
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(fd, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        finally:
            os.close(fd)

    def commit(self, partial: Path, blob_hash: bytes, meta: BlobMeta) -> None:
        """Make a verified partial file the complete blob ``blob_hash`` (see module doc)."""
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self.blob_path(blob_hash)
        self._ensure_dir(final.parent)
        sidecar = self.sidecar_path(blob_hash)
        self._write_atomic(sidecar, meta.to_json(blob_hash))
        os.replace(partial, final)
        _fsync_dir(final.parent)
        _fsync_dir(partial.parent)

    def _ensure_dir(self, directory: Path) -> None:
        """Create a blob's ``ab/`` directory if needed, with its entry in the root fsynced.

        Under a lock: a commit into a directory another thread has just created waits until
        that directory is durable."""
        with self._mkdir_lock:
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.root)

    def delete_blob(self, blob_hash: bytes) -> bool:
        """Remove a blob (its file first, so it stops counting as complete at once)."""
        removed = _unlink(self.blob_path(blob_hash))
        _unlink(self.sidecar_path(blob_hash))
        return removed

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}{TMP_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=True) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise

    # -- unfinished uploads --------------------------------------------------------------------
    @staticmethod
    def reset_partial(path: Path) -> None:
        """An empty partial file (emptying a stray one a crash left behind)."""
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))

    @staticmethod
    def partial_size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def load_partial(self, path: Path) -> tuple[int, Hasher]:
        """The bytes a partial file holds and a SHA-256 state over them (after a restart)."""
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb", buffering=0) as f:
                while block := f.read(_READ_BLOCK):
                    hasher.update(block)
                    size += len(block)
        except FileNotFoundError:
            pass
        return size, hasher

    @staticmethod
    def append(path: Path, offset: int, data: bytes | memoryview, hasher: Hasher) -> None:
        """Write ``data`` at ``offset`` (= the bytes held so far) and add it to ``hasher``.

        The file is created by the first write; at offset 0 a stray file a crash left behind
        is emptied first.  On failure (disk full...) the file is cut back to ``offset`` and
        ``hasher`` is left untouched, so the upload stays consistent and the chunk can be sent
        again."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0)
        fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            done = 0
            try:
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, offset)
                raise
        finally:
            os.close(fd)
        hasher.update(view)

    @staticmethod
    def discard(path: Path) -> bool:
        return _unlink(path)

    # -- collection ----------------------------------------------------------------------------
    def list_partials(self) -> list[PartialFile]:
        out = []
        for p in self.partial_dir.glob("*" + PARTIAL_SUFFIX):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append(PartialFile(p.name[: -len(PARTIAL_SUFFIX)], st.st_size, st.st_mtime))
        return out

    def blob_dirs(self) -> list[Path]:
        """The ``ab/`` directories that may hold blobs."""
        return sorted(p for p in self.root.iterdir()
                      if _PREFIX_DIR.fullmatch(p.name) and p.is_dir())

    @staticmethod
    def list_blobs(directory: Path, older_than: float) -> list[bytes]:
        """Hashes of the complete blobs in ``directory`` last written before ``older_than``."""
        out = []
        for path in directory.iterdir():
            if not _BLOB_NAME.fullmatch(path.name):
                continue
            try:
                if path.stat().st_mtime < older_than:
                    out.append(bytes.fromhex(path.name))
            except FileNotFoundError:
                continue
        return out

    def sweep(self, keep_partials: set[str], older_than: float) -> int:
        """Delete stray files last modified before ``older_than`` (unix seconds):

        partial files no upload record names, temporary files, sidecars without a blob.
        Returns how many files were removed."""
        removed = 0
        for pf in self.list_partials():
            if pf.name not in keep_partials and pf.mtime < older_than:
                removed += _unlink(self.partial_dir / (pf.name + PARTIAL_SUFFIX))
        for path in self.root.glob("*/*"):
            if path.parent == self.partial_dir:
                continue
            if path.name.endswith(SIDECAR_SUFFIX):
                if path.with_name(path.name[: -len(SIDECAR_SUFFIX)]).exists():
                    continue  # the common case: one stat per blob
            elif not path.name.endswith(TMP_SUFFIX):
                continue
            try:
                if path.stat().st_mtime < older_than:
                    removed += _unlink(path)
            except FileNotFoundError:
                continue
        return removed
