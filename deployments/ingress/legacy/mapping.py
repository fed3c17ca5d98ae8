"""Old requests to v2 job specs, and v2 results and job views back to the old shapes.

Shared by the legacy adapters (`rest.py`, `slim.py`, `ws.py`): an old analysis becomes a v2
`analyze` job with mapped options, its rows come back with the old column names
(`kl_divergence`, `explanation_structured`, ...) under `result.data`, next to
`result.metadata` (README §Migrating from the old backend).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from pydantic import TypeAdapter, ValidationError

from deployments.config import GroupSpec
from deployments.ingress.jobs import JobSpec
from deployments.ingress.legacy.schemas import (
    DEFAULT_SEED,
    LegacyAnalyzeOptions,
    LegacyGenerateOptions,
    SlimMessage,
)
from deployments.ingress.schemas import AnalyzeRequest, ChatMessage, GenerateRequest
from deployments.ingress.state import IngressState
from lenscore import BadInput

# v2 job status -> the old backend's request status.
STATUS_NAMES = {
    "queued": "queued",
    "running": "processing",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}

_MESSAGES = TypeAdapter(list[ChatMessage])


def default_lens_id(state: IngressState) -> str:
    """Return the lens old clients get without a model id: the first visible one."""
    for group in state.groups.values():
        for lens in group.lenses:
            if group.visible and lens.visible:
                return lens.lens_id
    return next(iter(state.group_of_lens))


def first_lens_of(state: IngressState, group_id: str) -> str:
    """Return the slim API's default: the first lens of the group (raises `UnknownGroup`)."""
    group = state.group(group_id)
    visible = [lens.lens_id for lens in group.lenses if lens.visible]
    return (visible or [group.lenses[0].lens_id])[0]


def chat_input(text: str, options: LegacyAnalyzeOptions | LegacyGenerateOptions) -> dict:
    """`{"text"}`, or `{"messages"}` when the old client asked for the chat format.

    A chat text is a JSON list of `{role, content}`; any other text becomes one user turn.

    Raises:
        BadInput: the JSON chat has an unknown role or a message without content.

    """
    if not (options.is_chat or options.use_chat_format):
        return {"text": text}
    stripped = text.strip()
    parsed: Any = None
    if stripped.startswith("["):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError:
            parsed = None
    if not isinstance(parsed, list):
        return {"messages": [{"role": "user", "content": text}]}
    try:
        messages = _MESSAGES.validate_python(
            [{"role": m.get("role"), "content": m.get("content")} for m in parsed]
        )
    except (ValidationError, AttributeError) as exc:
        raise BadInput(f"the chat text is not a list of {{role, content}} messages: {exc}") from exc
    return {"messages": [m.model_dump() for m in messages]}


def analysis_options(options: LegacyAnalyzeOptions) -> tuple[dict[str, Any], list[str]]:
    """v2 analysis options for old ones, and the names of old options lens-serve ignores."""
    best = options.optimize_explanations_config
    v2: dict[str, Any] = {
        "temperature": options.temperature,
        "seed": options.seed,
        "best_of_k": best.best_of_k if best is not None else 1,
        "calculate_salience": options.calculate_salience and options.calculate_token_salience,
        "logit_lens": options.logit_lens_analysis or options.use_logit_lens,
        "kl": not (options.no_kl or options.no_eval),
        "return_structured": options.return_structured,
    }
    if best is not None and best.best_of_k > 1 and best.temperature > 0:
        v2["optimize_temperature"] = best.temperature
    if options.last_n_messages is not None:
        v2["last_n_messages"] = options.last_n_messages
    ignored = [
        name
        for name, value in (
            ("tuned_lens", options.tuned_lens or options.use_tuned_lens),
            ("do_hard_tokens", options.do_hard_tokens),
            ("add_tokens", options.add_tokens),
            ("replace_left", options.replace_left),
            ("replace_right", options.replace_right),
        )
        if value
    ]
    return v2, ignored


def analysis_spec(
    lens_id: str, inputs: dict[str, Any], options: dict[str, Any], legacy: dict[str, Any]
) -> tuple[JobSpec, AnalyzeRequest]:
    """Return a v2 analyze job for an old analysis (`legacy` is kept with the request)."""
    body = AnalyzeRequest.model_validate({**inputs, "options": options})
    request = {"kind": "analyze", "lens_id": lens_id, **body.model_dump(exclude_unset=True)}
    spec = JobSpec("analyze", lens_id, body.replica_body(), {**request, "legacy": legacy})
    return spec, body


def generation_spec(
    lens_id: str, inputs: dict[str, Any], fields: dict[str, Any], legacy: dict[str, Any]
) -> tuple[JobSpec, GenerateRequest]:
    """Return a v2 generate job for an old generation."""
    body = GenerateRequest.model_validate({**inputs, **fields})
    request = {"kind": "generate", "lens_id": lens_id, **body.model_dump(exclude_unset=True)}
    spec = JobSpec("generate", lens_id, body.replica_body(), {**request, "legacy": legacy})
    return spec, body


def slim_messages(messages: list[SlimMessage]) -> list[dict[str, str]]:
    """Slim messages as v2 messages (extra keys dropped)."""
    return [{"role": m.role, "content": m.content} for m in messages]


# --- results back to the old shapes ---------------------------------------------------------


def legacy_row(row: dict[str, Any], layer: int, structured: bool) -> dict[str, Any]:
    """One v2 result row with the old backend's column names."""
    top = row.get("logit_lens_top")
    out = {
        "position": row["position"],
        "token": row["token"],
        "explanation": row["explanation"],
        "mse": row["mse"],
        "relative_rmse": row.get("relative_rmse"),
        "kl_divergence": row.get("kl"),
        "token_salience": row.get("token_salience"),
        "tuned_lens_top": None,
        "logit_lens_top": ", ".join(e["token"] for e in top) if top else None,
        "layer": layer,
    }
    if structured:
        out["explanation_structured"] = row.get("explanation_tokens")
    return out


def lens_metadata(state: IngressState, lens_id: str) -> dict[str, Any]:
    """Return what the old metadata said about the model: names, layer, checkpoint (file name)."""
    group: GroupSpec = state.group_for_lens(lens_id)
    lens = group.lens(lens_id)
    return {
        "model_id": lens_id,
        "model_name": lens.name,
        "encoder_decoder_model": lens.name,
        "orig_model_name": group.name,
        "shared_base_model": group.base_model.name,
        "donor_model": lens.donor or group.base_model.name,
        "layer": lens.layer,
        "checkpoint_path": lens.checkpoint.name,
        "group_id": group.group_id,
    }


def legacy_result(state: IngressState, view: dict[str, Any]) -> dict[str, Any] | None:
    """Return a completed job's result in the old shape of its kind."""
    result = view.get("result")
    if result is None:
        return None
    request = view.get("request") or {}
    legacy = request.get("legacy") or {}
    metadata = {**lens_metadata(state, view["lens_id"]), "lens_serve_meta": result.get("meta")}
    if legacy.get("ignored_options"):
        metadata["ignored_options"] = legacy["ignored_options"]
    if view["kind"] == "analyze":
        return _analysis(result, request, metadata)
    if view["kind"] == "generate":
        texts = [c["text"] for c in result.get("continuations", [])]
        if legacy.get("return_full_text") and isinstance(request.get("text"), str):
            texts = [request["text"] + text for text in texts]
        metadata.update(
            prompt=request.get("text", request.get("messages")),
            num_completions=len(texts),
            max_new_tokens=request.get("max_new_tokens"),
            temperature=request.get("temperature"),
        )
        return {"completions": texts, "metadata": metadata}
    metadata.update(messages=request.get("messages"), max_tokens=request.get("max_new_tokens"),
                    temperature=request.get("temperature"))  # fmt: skip
    return {"response": result.get("response", ""), "metadata": metadata}


def _analysis(
    result: dict[str, Any], request: dict[str, Any], metadata: dict[str, Any]
) -> dict[str, Any]:
    options = (result.get("meta") or {}).get("options") or request.get("options") or {}
    structured = bool((request.get("options") or {}).get("return_structured", False))
    rows = [legacy_row(row, metadata["layer"], structured) for row in result.get("rows", [])]
    metadata.update(
        best_of_k=options.get("best_of_k", 1),
        temperature=options.get("temperature"),
        seed=options.get("seed", DEFAULT_SEED),
        batch_size=options.get("batch_size"),
    )
    return {"data": rows, "metadata": metadata}


def iso(timestamp: float | None) -> str | None:
    """Unix time as the old backend wrote it (naive UTC ISO 8601)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).replace(tzinfo=None).isoformat()


def error_text(view: dict[str, Any]) -> str | None:
    """Return the old backend's `error`: a message string."""
    error = view.get("error")
    return None if error is None else str(error.get("message", error))


def status_body(state: IngressState, view: dict[str, Any]) -> dict[str, Any]:
    """Return the old `GET /status/{request_id}` answer for a job."""
    status = STATUS_NAMES[view["status"]]
    return {
        "request_id": view["job_id"],
        "status": status,
        "created_at": iso(view.get("created_at")),
        "started_at": iso(view.get("started_at")),
        "completed_at": iso(view.get("finished_at")),
        "processing_time": (view.get("timings") or {}).get("run_seconds"),
        "queue_position": view.get("queue_position"),
        "result": legacy_result(state, view) if status == "completed" else None,
        "error": error_text(view),
    }
