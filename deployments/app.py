"""The Serve application builder: one group deployment per group file, plus the ingress.

Data path: `Ingress` (deployments/ingress/) -> one `GroupServer` deployment per group
(deployments/replica/) -> lenscore.

`deployments.app:build_app` is the `import_path` of serve_config.yaml; this is the only module
that calls `serve.deployment` and `.bind` (STYLE §1).
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.checks import startup_report
from deployments.config import AppArgs, GroupConfigError, GroupSpec
from deployments.group_files import load_groups
from deployments.ingress.server import build_ingress_deployment_class
from deployments.replica.server import GroupServer

INGRESS_NAME = "Ingress"

log = logging.getLogger("ray.serve")


def group_deployment_options(group: GroupSpec) -> dict[str, Any]:
    """Return the `serve.deployment` options of one group from its `replica` block.

    A fixed replica count (min == max) becomes `num_replicas`, so Serve runs no autoscaler
    for it. serve_config.yaml overrides any of these per deployment name.
    """
    options = group.replica.deployment_options()
    scaling = group.replica.autoscaling
    if scaling.min_replicas == scaling.max_replicas:
        del options["autoscaling_config"]
        options["num_replicas"] = scaling.min_replicas
    return options


def build_app(args: dict[str, Any]) -> Application:
    """Build the lens-serve application from its serve_config.yaml `args`.

    A lens whose checkpoint (or donor) fails its check is served as unavailable, and a group
    whose base cannot load is not deployed; the rest serves. With `strict_startup` any such
    problem refuses the whole application instead.

    Raises:
        pydantic.ValidationError: the args are invalid.
        GroupConfigError: a group file is invalid, or (strict) anything it names is.

    """
    app_args = AppArgs.model_validate(args)
    groups = load_groups(app_args.groups_dir)
    report = startup_report(groups)
    if report.lines and app_args.strict_startup:
        raise GroupConfigError(report.lines)
    for line in report.lines:
        log.warning("serving without it: %s", line)
    handles = {
        group.group_id: serve.deployment(
            GroupServer, name=group.group_id, **group_deployment_options(group)
        ).bind(group)
        for group in groups
        if group.group_id not in report.groups
    }
    # Serve's default of 5 ongoing requests would queue every 6th client at the router,
    # which only waits on replicas; serve_config.yaml may set its own value.
    ingress = serve.deployment(
        build_ingress_deployment_class(), name=INGRESS_NAME, max_ongoing_requests=200
    )
    return ingress.bind(app_args, groups, handles, report)
