"""The ingress: the FastAPI app that authenticates, validates and routes every request.

`server` (the deployment class and app), `middleware`, `auth`, `errors`, `schemas`, then
`routes/` (one module per resource), which call group replicas through `calls` and `state`.
"""

__all__ = ["build_ingress_deployment_class"]

from deployments.ingress.server import build_ingress_deployment_class
