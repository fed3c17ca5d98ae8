"""The group replica: the base once on its device, lenses multiplexed on top.

`server.GroupServer` is the deployment class; `residency` (the lens switch), `execution`
(torch work off the event loop), `multiplex` (Serve's LRU), `tiers`, `memory`, `status` and
`registry` are its parts, in that order down the data path.
"""

__all__ = ["GroupServer", "ReplicaStatus"]

from deployments.replica.server import GroupServer
from deployments.replica.status import ReplicaStatus
