"""The old backend's clients, mapped onto v2: REST (`rest`), the slim API (`slim`), `/ws` (`ws`).

`ingress/server.py` mounts `routers`; each carries `require_api_key` like every v2 router.
"""

from deployments.ingress.legacy import rest, slim, ws

routers = (rest.router, slim.router, ws.router)

__all__ = ["rest", "routers", "slim", "ws"]
