"""Shared helpers of the ws_bridge tests."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qpc_ws_bridge.bridge import WsBridge

from qpc_core.app import App
from qpc_core.testing import until  # noqa: F401 - re-exported for the tests


def bridge(app: App) -> WsBridge:
    b: WsBridge = app.state["ws_bridge"]
    return b


def ws_url(app: App, path: str = "/v1/ws", host: str | None = None) -> str:
    addr = bridge(app).address
    assert addr is not None
    return f"ws://{host or addr[0]}:{addr[1]}{path}"


def bridge_settings(**ws: Any) -> dict[str, Any]:
    return {"plugins": ["ws_bridge"], "ws_bridge": {"listen": "127.0.0.1:0", **ws}}


@contextlib.contextmanager
def page_server(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on loopback; yields the origin (http://127.0.0.1:port)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)
