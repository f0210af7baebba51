"""Shared helpers of the ws_bridge tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from qpc_ws_bridge.bridge import WsBridge

from qpc_core.app import App


def bridge(app: App) -> WsBridge:
    b: WsBridge = app.state["ws_bridge"]
    return b


def ws_url(app: App, path: str = "/v1/ws", host: str | None = None) -> str:
    addr = bridge(app).address
    assert addr is not None
    return f"ws://{host or addr[0]}:{addr[1]}{path}"


def bridge_settings(**ws: Any) -> dict[str, Any]:
    return {"plugins": ["ws_bridge"], "ws_bridge": {"listen": "127.0.0.1:0", **ws}}


async def until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    """Yield to the server until ``cond()`` holds (a state the test waits for), or fail."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the deadline")
        await asyncio.sleep(0.001)
