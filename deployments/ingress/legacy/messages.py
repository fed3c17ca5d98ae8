"""The old `/ws` protocol's messages built from job events (`legacy/ws.py` sends them).

`progress` carries `current`, `total`, a percentage and an ETA; a finished job becomes
`completed` (analysis), `generation_complete`, `request_cancelled`, `error` or
`generation_error`, with results in the old shapes (`mapping.legacy_result`).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError

from deployments.ingress.jobs import JobSpec
from deployments.ingress.legacy import mapping
from deployments.ingress.legacy.schemas import AUTO_BATCH_SIZE_MAX
from deployments.ingress.state import IngressState
from lenscore import BadInput

NO_GLOBAL_SWITCH = (
    "lens {lens_id} selected for this connection only; lens-serve has no global model "
    "switch, so other users are not affected (lenses load on first use)"
)


def greeting(state: IngressState, lens_id: str) -> dict[str, Any]:
    """Return `connection_established`: the connection's lens (the default until switched)."""
    lens = state.group_for_lens(lens_id).lens(lens_id)
    return {
        "type": "connection_established",
        "message": "Connected to lens-serve; " + NO_GLOBAL_SWITCH.format(lens_id=lens_id),
        "model_id": lens_id,
        "model_name": lens.name,
        "auto_batch_size_max": AUTO_BATCH_SIZE_MAX,
        "generation_config": {},
    }


def switch_complete(info: dict[str, Any]) -> dict[str, Any]:
    """Return `model_switch_complete` for a lens selected on one connection (`model_info`)."""
    return {
        "type": "model_switch_complete",
        "model_id": info["model_id"],
        "group_id": info["group_id"],
        "device_id": None,
        "message": NO_GLOBAL_SWITCH.format(lens_id=info["model_id"]),
        "model_info": info,
        "generation_config": {},
        "scope": "connection",
    }


def progress(ids: dict[str, Any], event: dict[str, Any], started: float | None) -> dict:
    """Return `progress`: positions done, total, percent and seconds left (from the pace)."""
    done, total = event["done"], event["total"]
    eta = None
    if started is not None and done:
        eta = round((time.monotonic() - started) / done * (total - done), 1)
    return {"type": "progress", **ids, "current": done, "total": total,
            "progress": 100.0 * done / total if total else 0.0,
            "message": f"Analyzing tokens ({done}/{total})", "eta_seconds": eta}  # fmt: skip


def finished(
    state: IngressState, spec: JobSpec, event: dict[str, Any], ids: dict[str, Any]
) -> dict[str, Any]:
    """Return the message for a job's end, in the old shape of its kind."""
    status, error = event["status"], event.get("error") or {}
    if status == "completed":
        view = {"kind": spec.kind, "lens_id": spec.lens_id, "request": spec.request,
                "result": event["result"]}  # fmt: skip
        result = mapping.legacy_result(state, view) or {}
        kind = "generation_complete" if spec.kind == "generate" else "completed"
        return {"type": kind, **ids, "result": result}
    if status == "cancelled":
        return {"type": "request_cancelled", **ids, "message": "Request cancelled"}
    kind = "generation_error" if spec.kind == "generate" else "error"
    return {"type": kind, **ids, "error": error.get("message", "failed"),
            "code": error.get("code")}  # fmt: skip


def as_lens_error(exc: Exception) -> Exception:
    """Return a pydantic validation error as `BadInput` (other errors unchanged)."""
    if isinstance(exc, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return BadInput(problems, {"problems": exc.errors(include_url=False)})
    return exc
