"""Headless Chromium for tests of web pages and browser clients: start Debian's Chromium,
drive one tab through the Chrome DevTools Protocol (over ``websockets``), evaluate JavaScript.

Used by the admin status page's test and the ``ws_bridge`` plugin's browser test.
``make system-deps`` installs Chromium (Debian package ``chromium``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-proxy-server", "--remote-debugging-port=0",
]
DEVTOOLS = re.compile(r"DevTools listening on (ws://\S+)")


class Cdp:
    """A minimal Chrome DevTools Protocol client (flat sessions) over ``websockets``."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self._pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    if "error" in msg:
                        fut.set_exception(RuntimeError(f"CDP error: {msg['error']}"))
                    else:
                        fut.set_result(msg.get("result", {}))
                continue
            for method, waiter in list(self._waiters):
                if method == msg.get("method") and not waiter.done():
                    waiter.set_result(msg.get("params", {}))

    def event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event (create it before causing the event)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((method, fut))
        return fut

    async def call(self, method: str, session: str | None = None, **params: Any) -> Any:
        mid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        if session is not None:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        return await asyncio.wait_for(fut, 30)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self.ws.close()


class Page:
    def __init__(self, cdp: Cdp, session: str) -> None:
        self.cdp = cdp
        self.session = session

    async def goto(self, url: str) -> None:
        loaded = self.cdp.event("Page.loadEventFired")
        await self.cdp.call("Page.navigate", self.session, url=url)
        await asyncio.wait_for(loaded, 30)

    async def evaluate(self, expression: str) -> Any:
        res = await self.cdp.call("Runtime.evaluate", self.session, expression=expression,
                                  awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            details = res["exceptionDetails"]
            raise AssertionError(details.get("exception", {}).get("description", details))
        return res["result"].get("value")

    async def wait_for(
        self, condition: str, ids: Sequence[str] = (), timeout_ms: int = 20_000
    ) -> dict[str, str]:
        """Wait in the page (MutationObserver) until ``condition`` holds; ``T(id)`` is the text
        of element ``id``.  Returns the text of the elements ``ids`` at that moment."""
        js = """
new Promise((resolve, reject) => {
  const T = (id) => document.getElementById(id).textContent;
  const figures = () => Object.fromEntries(
    __IDS__.map((id) => [id, T(id)]));
  let obs = null, timer = null;
  const check = () => {
    let ok = false;
    try { ok = Boolean(__CONDITION__); } catch (e) { ok = false; }
    if (ok) { if (obs) obs.disconnect(); clearTimeout(timer); resolve(figures()); }
    return ok;
  };
  if (check()) return;
  obs = new MutationObserver(check);
  obs.observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
  timer = setTimeout(() => { obs.disconnect();
    reject(new Error("timed out waiting for " + __QUOTED__ + ": " + JSON.stringify(figures())));
  }, __TIMEOUT__);
})"""
        js = (js.replace("__CONDITION__", condition).replace("__QUOTED__", json.dumps(condition))
              .replace("__TIMEOUT__", str(timeout_ms)).replace("__IDS__", json.dumps(list(ids))))
        result: dict[str, str] = await self.evaluate(js)
        return result


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Page]:
    """Headless Chromium with a DevTools websocket; yields one page (tab)."""
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr = proc.stderr
    log: list[str] = []

    async def devtools_url() -> str:
        while True:
            line = await stderr.readline()
            if not line:
                raise AssertionError("chromium exited:\n" + "".join(log))
            text = line.decode(errors="replace")
            log.append(text)
            m = DEVTOOLS.search(text)
            if m:
                return m.group(1)

    async def drain() -> None:
        while await stderr.readline():
            pass

    drainer: asyncio.Task[None] | None = None
    cdp: Cdp | None = None
    try:
        url = await asyncio.wait_for(devtools_url(), 60)
        drainer = asyncio.ensure_future(drain())
        cdp = Cdp(await ws_connect(url, max_size=None))
        target = await cdp.call("Target.createTarget", url="about:blank")
        attached = await cdp.call("Target.attachToTarget", targetId=target["targetId"],
                                  flatten=True)
        session = attached["sessionId"]
        await cdp.call("Page.enable", session)
        await cdp.call("Runtime.enable", session)
        yield Page(cdp, session)
    finally:
        if cdp is not None:
            with contextlib.suppress(Exception):
                await cdp.call("Browser.close")
            await cdp.close()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if drainer is not None:
            await drainer
