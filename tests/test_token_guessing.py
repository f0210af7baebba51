"""Refused bearer tokens are rate-limited per client IP (no online guessing at full speed)."""

from __future__ import annotations

import pytest

from qpc_core.errors import RateLimited, Unauthenticated
from qpc_core.pb import common_pb2

LIMITS = {"auth": {"requests": 2, "window_secs": 600}}  # x rate_limit_ip_factor 3 = 6 per IP


def whoami(token: bytes) -> common_pb2.WhoAmIRequest:
    return common_pb2.WhoAmIRequest(auth=common_pb2.Auth(access_token=token))


async def test_refused_tokens_are_limited_per_ip(app_factory, connect) -> None:
    app = await app_factory(rate_limits=LIMITS, rate_limit_ip_factor=3)
    limited: list[tuple[str, str, int]] = []
    orig = app.hooks.on_rate_limited

    def spy(app_, key_kind, group, method_id, retry_after):
        limited.append((key_kind, group, method_id))
        return orig(app_, key_kind, group, method_id, retry_after)

    app.hooks.on_rate_limited = spy  # type: ignore[method-assign]
    c = await connect(app, token=None, new_identity=False)
    outcomes = []
    for i in range(9):
        try:
            await c.call(106, whoami(b"guess-%d" % i), common_pb2.WhoAmIResponse)
            outcomes.append("ok")
        except RateLimited as e:
            assert e.retry_after and e.retry_after > 0
            outcomes.append("limited")
        except Unauthenticated:
            outcomes.append("refused")
    assert outcomes == ["refused"] * 6 + ["limited"] * 3
    assert limited[-1] == ("ip", "auth", 0)
    # While the address is locked out, tokens are not even looked at (a valid one included).
    with pytest.raises(RateLimited):
        await c.call(106, whoami(b"devtoken"), common_pb2.WhoAmIResponse)
    # Open methods without a token still answer.
    assert (await c.health()).status == "ok"


async def test_accepted_tokens_count_nothing(app_factory, connect) -> None:
    app = await app_factory(rate_limits=LIMITS, rate_limit_ip_factor=3)
    c = await connect(app, token=None, new_identity=False)
    for _ in range(20):  # far beyond the 6 refusals the address may have
        who = await c.call(106, whoami(b"devtoken"), common_pb2.WhoAmIResponse)
        assert who.authenticated
    with pytest.raises(Unauthenticated):  # a refusal still counts normally afterwards
        await c.call(106, whoami(b"wrong"), common_pb2.WhoAmIResponse)


async def test_refused_handshake_tokens_are_limited_too(app_factory, connect) -> None:
    app = await app_factory(rate_limits=LIMITS, rate_limit_ip_factor=3)
    outcomes = []
    for i in range(8):
        try:
            await connect(app, token=f"guess-{i}", new_identity=False)
            outcomes.append("ok")
        except RateLimited:
            outcomes.append("limited")
        except Unauthenticated:
            outcomes.append("refused")
    assert outcomes == ["refused"] * 6 + ["limited"] * 2
    with pytest.raises(RateLimited):  # the right token waits for the window as well
        await connect(app, new_identity=False)
