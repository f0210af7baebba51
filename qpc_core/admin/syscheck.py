"""Start-up check of the OS limits the scaling guide recommends ("Connection Tuning").

The guide, for high connection counts::

    ulimit -n 65536
    net.core.rmem_max = 26214400      net.core.wmem_max = 26214400
    net.core.rmem_default = 1048576   net.core.wmem_default = 1048576

qpc treats ``max_connections >= 1000`` as a high connection count (the lower bound of the
guide's "Recommended" tier, 1,000-5,000 users) and then expects exactly those values.  Below
that only the open-file limit is checked, against a floor of 1024 (the SQLCipher pool, its
WAL files, admin HTTP clients and blob files need descriptors even though all QUIC
connections share one UDP socket).  Every shortfall is one warning that says how to fix it;
nothing is changed on the system.

:func:`check_system` takes the readers as arguments so tests can inject values; the
built-in ``admin`` plugin calls it at start-up with the running system's values.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("qpc.syscheck")

HIGH_CONNECTIONS = 1000
GUIDE_NOFILE = 65536
MIN_NOFILE = 1024
GUIDE_SYSCTL: dict[str, int] = {
    "net.core.rmem_max": 26_214_400,
    "net.core.wmem_max": 26_214_400,
    "net.core.rmem_default": 1_048_576,
    "net.core.wmem_default": 1_048_576,
}
SYSCTL_FILE = "/etc/sysctl.d/99-qpc.conf"

SysctlReader = Callable[[str], int | None]
NofileReader = Callable[[], tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Recommendation:
    nofile: int
    sysctl: dict[str, int]


def recommended(max_connections: int) -> Recommendation:
    """What the guide recommends for a server configured with ``max_connections``."""
    if max_connections >= HIGH_CONNECTIONS:
        return Recommendation(GUIDE_NOFILE, dict(GUIDE_SYSCTL))
    return Recommendation(MIN_NOFILE, {})


def read_sysctl(name: str) -> int | None:
    """``net.core.rmem_max`` → the integer in ``/proc/sys/net/core/rmem_max`` (None if absent)."""
    path = Path("/proc/sys") / name.replace(".", "/")
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_nofile() -> tuple[int, int]:
    """(soft, hard) open-file limit of this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return int(soft), int(hard)


def _is_below(value: int, want: int) -> bool:
    return value != resource.RLIM_INFINITY and value < want


def check_system(
    max_connections: int,
    *,
    sysctl: SysctlReader = read_sysctl,
    nofile: NofileReader = read_nofile,
) -> list[str]:
    """Return one warning per limit below the guide's recommendation (empty when all good)."""
    rec = recommended(max_connections)
    problems: list[str] = []
    soft, hard = nofile()
    if _is_below(soft, rec.nofile):
        hint = (
            f"the hard limit is {hard}, so `ulimit -n {rec.nofile}` in the service's shell works"
            if not _is_below(hard, rec.nofile)
            else f"raise the hard limit too (systemd LimitNOFILE={rec.nofile}, docker "
            f"ulimits.nofile {rec.nofile})"
        )
        problems.append(
            f"open-file limit (ulimit -n) is {soft}, below the {rec.nofile} the scaling guide "
            f"recommends for max_connections={max_connections}: {hint}"
        )
    low = []
    for name, want in rec.sysctl.items():
        value = sysctl(name)
        if value is None:
            continue  # not Linux, or hidden in a container: nothing we can check
        if value < want:
            low.append(f"{name} = {value} (< {want})")
    if low:
        problems.append(
            f"UDP buffer sizes below the scaling guide's values for max_connections="
            f"{max_connections}: {', '.join(low)}; put the guide's values in {SYSCTL_FILE} and "
            f"run `sysctl -p {SYSCTL_FILE}` (see docs/operations/README.md)"
        )
    return problems


def warn_system(max_connections: int) -> list[str]:
    """Check the running system and log each problem as a warning; return them."""
    problems = check_system(max_connections)
    for p in problems:
        log.warning("system check: %s", p)
    return problems
