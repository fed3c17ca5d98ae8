"""Bodies of durable jobs (`/api/v2/jobs`) and of `send_message`, one of their kinds.

Beside `schemas.py` (DESIGN §HTTP API): a job body is the body of its lens route plus `kind`
and `lens_id`; a job view carries status, progress, timings and, once done, the result.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.ingress.schemas import (
    MAX_SEED,
    AnalyzeRequest,
    ChatMessage,
    ErrorInfo,
    GenerateRequest,
)

JobKind = Literal["analyze", "generate", "send_message"]
JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]


class SendMessageRequest(BaseModel):
    """Body of `POST /api/v2/lenses/{lens_id}/send_message`."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(
        min_length=1, max_length=1000, description="The chat so far; rendered with its template."
    )
    prefill: str | None = Field(
        None, description="Text the assistant's reply starts with (not repeated in `response`)."
    )
    max_new_tokens: int = Field(1024, ge=1, le=4096, description="Tokens at most in the reply.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)

    def input_length(self) -> int:
        """Characters of input text: every message's content and the prefill."""
        return sum(len(m.content) for m in self.messages) + len(self.prefill or "")

    def input_dict(self) -> dict[str, Any]:
        """`{"messages": [...]}`, as logged."""
        return {"messages": [m.model_dump() for m in self.messages], "prefill": self.prefill}

    def replica_body(self) -> dict[str, Any]:
        """Return the body `GroupServer.send_message` takes."""
        return {
            "messages": [m.model_dump() for m in self.messages],
            "prefill": self.prefill,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
        }


class SendMessageResponse(BaseModel):
    """`POST /api/v2/lenses/{lens_id}/send_message`: the reply and why it ended."""

    model_config = ConfigDict(extra="allow")

    meta: dict[str, Any]
    response: str = Field(description="The new text of the reply (after the prefill).")
    prefill: str = Field("", description="The prefill the reply continued.")
    token_ids: list[int]
    stop_reason: Literal["end_of_turn", "max_tokens"]


# --- jobs --------------------------------------------------------------------------------


class AnalyzeJob(AnalyzeRequest):
    """`{"kind": "analyze", "lens_id", ...}`: the body of the analyze route."""

    kind: Literal["analyze"]
    lens_id: str


class GenerateJob(GenerateRequest):
    """`{"kind": "generate", "lens_id", ...}`: the body of the generate route."""

    kind: Literal["generate"]
    lens_id: str


class SendMessageJob(SendMessageRequest):
    """`{"kind": "send_message", "lens_id", ...}`: the body of the send_message route."""

    kind: Literal["send_message"]
    lens_id: str


JobRequest = Annotated[AnalyzeJob | GenerateJob | SendMessageJob, Field(discriminator="kind")]


class JobProgress(BaseModel):
    """Positions analysed so far (analyze jobs)."""

    done: int
    total: int


class JobView(BaseModel):
    """`GET /api/v2/jobs/{job_id}` (and the 202 of `POST /api/v2/jobs`)."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    kind: JobKind
    lens_id: str
    group_id: str | None = None
    status: JobStatus
    queue_position: int = Field(0, description="1-based among queued jobs; 0 once started.")
    progress: JobProgress | None = None
    created_at: float = Field(description="Unix time the job was accepted.")
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = Field(None, description="Unix time its result is dropped.")
    timings: dict[str, float] = Field(default_factory=dict)
    cancel_requested: bool = False
    result: dict[str, Any] | None = Field(
        None, description="The lens route's response body, once `completed`."
    )
    error: ErrorInfo | None = None
