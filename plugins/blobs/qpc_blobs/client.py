"""Client side of the blobs plugin for the SDK: :func:`upload`, :func:`download`, :func:`status`.

    blob_id = await upload(client, "photo.enc", mime_type="application/octet-stream")
    data = await download(client, blob_id, None)          # bytes, SHA-256 verified
    await download(client, blob_id, "copy.enc")           # to a file, written atomically

Uploads resume: :func:`upload` first asks BlobUploadStatus (602) and continues from the
number of bytes the server holds, so after a dropped connection (or a server restart) call it
again on a new connection.  Both directions keep up to ``window`` calls in flight so the
connection stays busy (the server re-orders chunks that overtake each other).

Encrypt before uploading: the server stores what it is given, and anyone authenticated who
knows a blob's id may download it (see README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeAlias

from qpc_blobs.store import Hasher
from qpc_core.client.sdk import QpcClient
from qpc_core.errors import BadRequest, Internal
from qpc_core.pb import blobs_pb2 as pb

UPLOAD_BLOB, DOWNLOAD_BLOB, BLOB_UPLOAD_STATUS = 600, 601, 602
DEFAULT_CHUNK = 256 * 1024
DEFAULT_WINDOW = 4
DEFAULT_MIME = "application/octet-stream"
_HASH_BLOCK = 1024 * 1024

Progress: TypeAlias = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``, called as the server acknowledges bytes."""

Source: TypeAlias = bytes | bytearray | memoryview | str | os.PathLike[str]
Dest: TypeAlias = str | os.PathLike[str] | None


class BlobIntegrityError(ValueError):
    """Downloaded bytes do not hash to the blob id (the server or the network lied)."""


async def status(client: QpcClient, blob_id: bytes) -> pb.BlobUploadStatusResponse:
    """How much of ``blob_id`` the server holds for this identity (602)."""
    return await client.call(BLOB_UPLOAD_STATUS, pb.BlobUploadStatusRequest(blob_hash=blob_id),
                             pb.BlobUploadStatusResponse)


async def upload_chunk(client: QpcClient, blob_id: bytes, offset: int, chunk: bytes,
                       total_size: int, mime_type: str = "") -> pb.UploadBlobResponse:
    """One UploadBlob (600) call."""
    return await client.call(UPLOAD_BLOB, pb.UploadBlobRequest(
        blob_hash=blob_id, chunk=chunk, offset=offset, total_size=total_size,
        mime_type=mime_type), pb.UploadBlobResponse)


async def download_chunk(client: QpcClient, blob_id: bytes, offset: int,
                         length: int = 0) -> pb.DownloadBlobResponse:
    """One DownloadBlob (601) call (``length`` 0: the server's default chunk)."""
    return await client.call(DOWNLOAD_BLOB, pb.DownloadBlobRequest(
        blob_id=blob_id, offset=offset, length=length), pb.DownloadBlobResponse)


class _Reader:
    """Random-access chunks of in-memory bytes or of a file (read in a worker thread)."""

    def __init__(self, source: Source) -> None:
        self.data: memoryview | None = None
        self.path: Path | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            self.data = memoryview(source).cast("B")
        else:
            self.path = Path(source)

    async def digest_and_size(self) -> tuple[bytes, int]:
        if self.data is not None:
            data = self.data
            return await asyncio.to_thread(lambda: hashlib.sha256(data).digest()), len(data)
        assert self.path is not None
        return await asyncio.to_thread(_hash_file, self.path)

    async def read(self, offset: int, size: int) -> bytes:
        if self.data is not None:
            return bytes(self.data[offset:offset + size])
        assert self.path is not None
        return await asyncio.to_thread(_read_at, self.path, offset, size)


def _hash_file(path: Path) -> tuple[bytes, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            size += len(block)
    return h.digest(), size


def _read_at(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


async def upload(client: QpcClient, data_or_path: Source, *, mime_type: str = DEFAULT_MIME,
                 chunk_size: int = DEFAULT_CHUNK, progress: Progress | None = None,
                 window: int = DEFAULT_WINDOW) -> bytes:
    """Upload bytes or a file; return the blob id (its SHA-256).

    Resumes an earlier upload of the same content by this identity: asks the server how much
    it holds (602) and sends only the rest.  Content the server already has is not sent
    again (it is claimed for this identity with one empty call).  Raises the server's
    :class:`~qpc_core.errors.RpcError` (``TOO_LARGE``, ``QUOTA_EXCEEDED``, ...) or
    ``ConnectionLost``; call again on a new connection to resume."""
    if chunk_size <= 0 or window <= 0:
        raise ValueError("chunk_size and window must be positive")
    reader = _Reader(data_or_path)
    blob_id, total = await reader.digest_and_size()
    st = await status(client, blob_id)
    # Stored already (claim it), or a partial of another size (a chunk at offset 0 makes the
    # server drop it and start over): 0.
    stale = st.complete or (st.total_size != 0 and st.total_size != total)
    start = 0 if stale else st.received
    if not st.complete and total and start >= total:
        # Every byte arrived but the blob was not committed (the server failed at the very
        # end): sending the last chunk again makes the server retry the commit.
        start = total - min(chunk_size, total)
    if progress is not None:
        progress(start, total)
    if st.complete:
        resp = await upload_chunk(client, blob_id, 0, b"", total, mime_type)
        return _completed(resp, blob_id, progress, total)

    async def send(offset: int) -> pb.UploadBlobResponse:
        chunk = await reader.read(offset, chunk_size)
        return await upload_chunk(client, blob_id, offset, chunk, total, mime_type)

    offset = start
    if start == 0:  # the first chunk starts the upload on the server: send it alone
        resp = await send(0)
        if resp.complete:
            return _completed(resp, blob_id, progress, total)
        offset = resp.received
        if progress is not None:
            progress(offset, total)
    in_flight: deque[asyncio.Task[pb.UploadBlobResponse]] = deque()
    try:
        while True:
            while offset < total and len(in_flight) < window:
                in_flight.append(asyncio.ensure_future(send(offset)))
                offset += chunk_size
            if not in_flight:
                raise Internal(f"server holds all {total} bytes but did not complete the blob")
            resp = await in_flight.popleft()
            if resp.complete:
                return _completed(resp, blob_id, progress, total)
            if progress is not None:
                progress(resp.received, total)
    finally:
        for t in in_flight:
            t.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)


def _completed(resp: pb.UploadBlobResponse, blob_id: bytes, progress: Progress | None,
               total: int) -> bytes:
    if not resp.complete or resp.blob_id != blob_id:
        raise Internal("server did not confirm the blob as complete")
    if progress is not None:
        progress(total, total)
    return blob_id


async def download(client: QpcClient, blob_id: bytes, dest: Dest = None, *,
                   progress: Progress | None = None, chunk_size: int = DEFAULT_CHUNK,
                   window: int = DEFAULT_WINDOW) -> bytes | None:
    """Download ``blob_id`` and check its SHA-256.

    With ``dest`` ``None`` return the bytes; otherwise write the file atomically (a
    temporary file next to it, renamed once the hash verified) and return ``None``.
    Raises ``NotFound`` (E027 BLOB_NOT_FOUND) or :class:`BlobIntegrityError`."""
    if len(blob_id) != 32:
        raise BadRequest(f"blob id must be 32 bytes, got {len(blob_id)}")
    if chunk_size <= 0 or window <= 0:
        raise ValueError("chunk_size and window must be positive")
    hasher = hashlib.sha256()
    buf = bytearray() if dest is None else None
    out: IO[bytes] | None = None
    tmp: Path | None = None
    if dest is not None:
        final = Path(dest)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.part")
        out = await asyncio.to_thread(open, tmp, "wb")
    try:
        first = await download_chunk(client, blob_id, 0, chunk_size)
        total = first.total_size
        if total and not first.chunk:
            raise Internal(f"server returned no bytes at offset 0 of a {total}-byte blob")
        # The server may cap the length; follow its size so requests stay aligned.
        step = min(chunk_size, len(first.chunk)) if total > len(first.chunk) else chunk_size
        done = await _consume(first.chunk, hasher, buf, out)
        if progress is not None:
            progress(done, total)
        await _download_rest(client, blob_id, done, total, step, window, hasher, buf, out,
                             progress)
        if hasher.digest() != blob_id:
            raise BlobIntegrityError(
                f"downloaded bytes hash to {hasher.hexdigest()}, not blob id {blob_id.hex()}")
        if out is not None and tmp is not None:
            await asyncio.to_thread(_close_and_rename, out, tmp, Path(dest))  # type: ignore[arg-type]
            out = None
            return None
        assert buf is not None
        return bytes(buf)
    finally:
        if out is not None:
            out.close()
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


async def _download_rest(client: QpcClient, blob_id: bytes, done: int, total: int, step: int,
                         window: int, hasher: Hasher, buf: bytearray | None,
                         out: IO[bytes] | None, progress: Progress | None) -> None:
    next_offset = done
    in_flight: deque[tuple[int, int, asyncio.Task[pb.DownloadBlobResponse]]] = deque()
    try:
        while done < total:
            while next_offset < total and len(in_flight) < window:
                n = min(step, total - next_offset)
                in_flight.append((next_offset, n, asyncio.ensure_future(
                    download_chunk(client, blob_id, next_offset, n))))
                next_offset += n
            off, n, task = in_flight.popleft()
            chunk = (await task).chunk
            while len(chunk) < n:  # a short answer: fetch the rest of this range in place
                more = (await download_chunk(client, blob_id, off + len(chunk),
                                             n - len(chunk))).chunk
                if not more:
                    raise Internal(f"server returned no bytes at offset {off + len(chunk)} "
                                   f"of a {total}-byte blob")
                chunk += more
            done += await _consume(chunk[:n], hasher, buf, out)
            if progress is not None:
                progress(done, total)
    finally:
        for _o, _n, t in in_flight:
            t.cancel()
        if in_flight:
            await asyncio.gather(*(t for _o, _n, t in in_flight), return_exceptions=True)


async def _consume(chunk: bytes, hasher: Hasher, buf: bytearray | None,
                   out: IO[bytes] | None) -> int:
    if out is not None:
        await asyncio.to_thread(_write_and_hash, out, chunk, hasher)
    else:
        assert buf is not None
        hasher.update(chunk)
        buf += chunk
    return len(chunk)


def _write_and_hash(out: IO[bytes], chunk: bytes, hasher: Hasher) -> None:
    out.write(chunk)
    hasher.update(chunk)


def _close_and_rename(out: IO[bytes], tmp: Path, final: Path) -> None:
    out.flush()
    os.fsync(out.fileno())
    out.close()
    os.replace(tmp, final)

