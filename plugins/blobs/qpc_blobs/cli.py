"""``qpc-client blob put FILE`` and ``qpc-client blob get ID -o FILE``.

qpc-client mounts these with :func:`add_commands` (on its sub-command parser) and runs them
with :func:`run` on its connected client.  A progress bar is drawn on stderr when stderr is
a terminal; otherwise only the result is printed (on stdout, JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from qpc_blobs import client as blobs
from qpc_core.client.sdk import QpcClient

COMMAND = "blob"


def add_commands(subparsers: Any) -> None:
    """Add ``blob put`` / ``blob get`` to qpc-client's ``add_subparsers()`` object."""
    blob = subparsers.add_parser(COMMAND, help="upload and download blobs (qpc-blobs plugin)")
    sub = blob.add_subparsers(dest="blob_command", required=True, metavar="{put,get}")
    put = sub.add_parser("put", help="upload FILE (resumes an interrupted upload); prints its id")
    put.add_argument("file", type=Path)
    put.add_argument("--mime-type", default=None,
                     help="stored with the blob (default: guessed from the file name)")
    put.add_argument("--chunk-size", type=int, default=blobs.DEFAULT_CHUNK, help=argparse.SUPPRESS)
    get = sub.add_parser("get", help="download blob ID (64 hex characters) to a file")
    get.add_argument("blob_id")
    get.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    get.add_argument("--chunk-size", type=int, default=blobs.DEFAULT_CHUNK, help=argparse.SUPPRESS)


class ProgressBar:
    """``[#####.....]  45%  22.5/50.0 MB  4.1 MB/s`` redrawn in place on a terminal.

    Does nothing when ``stream`` is not a terminal, so logs and pipes stay clean."""

    WIDTH = 30

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self.t0 = time.monotonic()
        self.start: int | None = None
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.start is None:
            self.start = done  # a resumed upload: measure the rate over what is sent now
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        filled = int(frac * self.WIDTH)
        rate = (done - self.start) / max(now - self.t0, 1e-6) / 1e6
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                          f"{frac:4.0%} {done / 1e6:.1f}/{total / 1e6:.1f} MB {rate:.1f} MB/s")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self.start is not None:
            self.stream.write("\n")
            self.stream.flush()


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if getattr(args, "json", False) else text)


def _fail(message: str) -> int:
    print(f"qpc-client: blob: {message}", file=sys.stderr)
    return 1


async def run(args: argparse.Namespace, client: QpcClient) -> int:
    """Run ``blob put`` / ``blob get``; return the process exit code.

    Server errors propagate as :class:`~qpc_core.errors.RpcError` (qpc-client prints them
    and exits 2); local problems print one line and return 1."""
    if args.blob_command == "put":
        path: Path = args.file
        if not path.is_file():
            return _fail(f"no such file: {path}")
        mime = args.mime_type or mimetypes.guess_type(path.name)[0] or blobs.DEFAULT_MIME
        bar = ProgressBar(f"put {path.name}")
        try:
            blob_id = await blobs.upload(client, path, mime_type=mime,
                                         chunk_size=args.chunk_size, progress=bar)
        finally:
            bar.finish()
        size = path.stat().st_size
        _emit(args, {"blob_id": blob_id.hex(), "size": size, "mime_type": mime},
              blob_id.hex())
        return 0
    if args.blob_command == "get":
        try:
            blob_id = bytes.fromhex(args.blob_id)
        except ValueError:
            blob_id = b""
        if len(blob_id) != 32:
            return _fail(f"ID must be 64 hex characters (a SHA-256), got {args.blob_id!r}")
        out: Path = args.output
        bar = ProgressBar(f"get {blob_id.hex()[:12]}")
        try:
            await blobs.download(client, blob_id, out, progress=bar, chunk_size=args.chunk_size)
        except blobs.BlobIntegrityError as e:
            return _fail(str(e))
        finally:
            bar.finish()
        size = out.stat().st_size
        _emit(args, {"blob_id": blob_id.hex(), "size": size, "path": str(out)},
              f"wrote {size} bytes to {out} (SHA-256 verified)")
        return 0
    return _fail(f"unknown command {args.blob_command!r}")
