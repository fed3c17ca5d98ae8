"""How a route hands a request to its group: admission checks and NDJSON relaying.

Between the routes (`routes/lenses.py`, `routes/ws.py`, the legacy adapters) and
`IngressState.call` / `open_stream`: check the lens id and the text length, log the request,
then relay the replica's events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentResponseGenerator

from deployments.ingress.errors import body_for
from deployments.ingress.schemas import AnalyzeRequest, GenerateRequest
from deployments.ingress.state import IngressState, cancel_quietly
from lenscore import TextTooLong

logger = logging.getLogger("ray.serve")

NDJSON_MEDIA_TYPE = "application/x-ndjson"


def check_text_length(length: int, max_text_length: int) -> None:
    """Raise `TextTooLong` (413) when a request's text exceeds `max_text_length` characters."""
    if length > max_text_length:
        raise TextTooLong(
            f"text of {length} characters is longer than the limit of {max_text_length}",
            {"length": length, "max_text_length": max_text_length},
        )


def admit(
    state: IngressState, lens_id: str, body: AnalyzeRequest | GenerateRequest, what: str
) -> str:
    """Check the lens id and the text length, log the request; return the group id."""
    group = state.group_for_lens(lens_id)
    length = body.input_length()
    check_text_length(length, state.args.max_text_length)
    if state.args.log_request_text:
        logger.info("%s lens=%s input=%r", what, lens_id, body.input_dict())
    else:
        logger.info("%s lens=%s chars=%d", what, lens_id, length)
    return group.group_id


def _line(item: dict[str, Any]) -> bytes:
    return (json.dumps(item, separators=(",", ":")) + "\n").encode()


async def ndjson_lines(first: Any, stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """Yield the replica's events as NDJSON lines; a failure mid-stream is an `error` event.

    Closing this iterator (the client went away) cancels the replica's generator, which stops
    the analysis between batches.
    """
    try:
        if first is not None:
            yield _line(first)
        async for item in stream:
            yield _line(item)
    except Exception as exc:  # the status line is sent: report it in-band
        yield _line({"event": "error", **body_for(exc)})
    finally:
        cancel_quietly(stream)


async def open_analysis(
    state: IngressState, lens_id: str, body: AnalyzeRequest
) -> tuple[Any, DeploymentResponseGenerator]:
    """Start `analyze_stream` on the lens's group and wait for its first event."""
    return await state.open_stream(lens_id, "analyze_stream", body.replica_body())
