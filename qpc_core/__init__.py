"""qpc: a plugin-based QUIC server for end-to-end encrypted messaging."""

__version__ = "0.1.0"
