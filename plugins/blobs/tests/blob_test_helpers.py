"""Helpers shared by the blobs plugin's tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from qpc_blobs.service import BlobService

from qpc_core.app import App

NS = "blobs"


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def svc(app: App) -> BlobService:
    service: BlobService = app.state["blobs"]
    return service


def blob_path(app: App, h: bytes) -> Path:
    return app.data_dir / "blobs" / h.hex()[:2] / h.hex()


def partial_files(app: App) -> list[Path]:
    return sorted((app.data_dir / "blobs" / "partial").iterdir())
