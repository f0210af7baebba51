"""Test helpers for the admin HTTP app: its URL and a small async HTTP client.

The client runs :mod:`urllib` in a worker thread, so a test can call a server that lives in
its own event loop without extra dependencies.  Status codes >= 400 are returned, not raised.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qpc_core.admin.state import admin_address

if TYPE_CHECKING:
    from qpc_core.app import App


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def admin_url(app: App, path: str = "/") -> str:
    addr = admin_address(app)
    if addr is None:
        raise AssertionError("the admin HTTP app is not running (metrics_enabled=True?)")
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"http://{host}:{addr[1]}{path}"


def _request(method: str, url: str, headers: dict[str, str], timeout: float) -> HttpResponse:
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpResponse(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as e:
        with e:
            return HttpResponse(e.code, dict(e.headers.items()), e.read())


async def http(
    method: str, url: str, *, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> HttpResponse:
    """One HTTP request; returns the response whatever its status."""
    return await asyncio.to_thread(_request, method, url, dict(headers or {}), timeout)


async def get(url: str, *, token: str | None = None, timeout: float = 10.0) -> HttpResponse:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    return await http("GET", url, headers=headers, timeout=timeout)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One ``/metrics`` scrape: samples by (name, labels), and each family's HELP and TYPE."""

    text: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    help: dict[str, str]
    types: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        from prometheus_client.parser import text_string_to_metric_families

        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        # HELP and TYPE as exposed (the parser strips "_total" from counter family names).
        helps: dict[str, str] = {}
        types: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, doc = line[7:].partition(" ")
                helps[name] = doc.replace("\\n", "\n").replace("\\\\", "\\")
            elif line.startswith("# TYPE "):
                name, _, kind = line[7:].partition(" ")
                types[name] = kind
        return cls(text, samples, helps, types)

    @property
    def names(self) -> set[str]:
        """Every sample name (``x_total``, ``h_bucket``, ``h_count``...)."""
        return {name for name, _ in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name{labels}`` (exact label set); KeyError when absent."""
        return self.samples[(name, frozenset(labels.items()))]

    def sum(self, name: str, **labels: str) -> float:
        """Sum of the samples ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


async def scrape(app: App) -> Scrape:
    r = await get(admin_url(app, "/metrics"))
    if r.status != 200:
        raise AssertionError(f"/metrics answered {r.status}: {r.text}")
    return Scrape.parse(r.text)
