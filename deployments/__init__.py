"""deployments: everything Ray Serve (application builder, group replica, ingress, metrics).

Importing this package imports no Ray: `lens-serve analyze` and `inspect` live in
`deployments.cli` and must start without it. `build_app` loads Ray on first use.
"""

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from deployments.app import build_app

        return build_app
    raise AttributeError(f"module 'deployments' has no attribute {name!r}")
