"""Re-export of the process helpers (kept for the core suite)."""

from qpc_core.testing import BIN, ServerProcess, free_udp_port

__all__ = ["BIN", "ServerProcess", "free_udp_port"]
