"""Root conftest: qpc's test fixtures for the core suite and every bundled plugin."""

pytest_plugins = ["qpc_core.testing"]
