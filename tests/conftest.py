"""Core test suite helpers (fixtures come from qpc_core.testing via the root conftest)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from qpc_core.testing import TEST_TOKEN, make_settings, quic_port, quic_transport  # noqa: E402

__all__ = ["TEST_TOKEN", "make_settings", "quic_port", "quic_transport"]
