"""The v2 HTTP routes, one `APIRouter` per module (STYLE §2); `ingress.py` mounts them."""

from deployments.api import groups, health, lenses, metrics, ws

__all__ = ["groups", "health", "lenses", "metrics", "ws"]
