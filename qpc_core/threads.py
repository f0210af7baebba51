"""OS-level names for qpc's own threads, so ``top -H``, ``ps -L`` and ``/proc/<pid>/task``
show which thread is which (Python 3.11 names threads only inside Python)."""

from __future__ import annotations

import ctypes
import sys

_PR_SET_NAME = 15
_MAX = 15  # bytes, without the terminating NUL (Linux's TASK_COMM_LEN is 16)

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _prctl = None


def name_os_thread(name: str) -> bool:
    """Name the calling thread in the OS (Linux; cut to 15 bytes).  Best effort: False
    where the platform has no such call."""
    if _prctl is None:
        return False
    raw = name.encode("ascii", "replace")[:_MAX]
    return bool(_prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0)
