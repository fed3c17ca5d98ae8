"""The v2 HTTP routes, one `APIRouter` per resource (STYLE §2); `ingress/server.py` mounts them.

Only `health` is open; every other router carries `require_api_key`.
"""

from deployments.ingress.routes import groups, health, lenses, metrics, ws

__all__ = ["groups", "health", "lenses", "metrics", "ws"]
