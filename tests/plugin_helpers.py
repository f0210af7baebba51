"""Select test-only plugin modules through fake entry points (no installation needed)."""

from __future__ import annotations

from importlib import metadata

import pytest

from qpc_core import plugins


def use_fake_plugins(monkeypatch: pytest.MonkeyPatch, **modules: str) -> None:
    """Make ``name -> tests.fake_plugins.<module>`` visible as entry points in group qpc."""
    real = plugins.available_entry_points

    def fake() -> dict[str, metadata.EntryPoint]:
        eps = dict(real())
        for name, mod in modules.items():
            eps[name] = metadata.EntryPoint(name=name, value=f"fake_plugins.{mod}", group="qpc")
        return eps

    monkeypatch.setattr(plugins, "available_entry_points", fake)
