"""The admin/metrics HTTP app: Starlette served by uvicorn inside the server's event loop.

Started by the built-in ``admin`` plugin on ``metrics_listen`` when ``metrics_enabled``
(see :mod:`qpc_core.admin.web` for the routes and the admin-token rule).  For plugins:

* :func:`metrics_registry` is the per-App Prometheus registry served at ``/metrics``;
* ``register_admin_routes`` routes are mounted under ``/p/<plugin name>/`` behind the token;
* :func:`admin_address` is where the app listens (port 0 in tests picks a free port).
"""

from __future__ import annotations

from qpc_core.admin.state import AdminState, admin_address, admin_state, metrics_registry

__all__ = ["AdminState", "admin_address", "admin_state", "metrics_registry"]
