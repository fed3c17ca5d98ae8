"""HTTP request and response bodies of the v2 API (DESIGN §HTTP API, §Response shapes).

The group status reuses the replica's own `ReplicaStatus` model, so both sides read one type.

Requests forbid unknown keys and enforce LENS_FORMAT §Analysis options bounds with 422s, never
clamping. Responses allow extra keys, so a field a replica adds later is passed through.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator

from deployments.replica.status import ReplicaStatus
from lenscore.options import BOUNDS

# torch seeds must fit an unsigned 64-bit int; we keep them non-negative and signed-safe.
MAX_SEED = BOUNDS["seed"].high


def bounded(name: str, default: Any, description: str) -> Any:
    """Return a `Field` bounded by lenscore's one table (`lenscore.options.BOUNDS`)."""
    bound = BOUNDS[name]
    low = {"gt": bound.low} if bound.low_open else {"ge": bound.low}
    return Field(default, le=bound.high, description=description, **low)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Request):
    """One chat turn, rendered with the base's chat template."""

    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="What they say.")


class AnalyzeOptions(_Request):
    """LENS_FORMAT §Analysis options; bounds are enforced with 422, not clamped."""

    temperature: float = bounded("temperature", 1.0, "0 = greedy (argmax).")
    seed: int | None = bounded("seed", None, "One seed per request (random if absent).")
    best_of_k: int = bounded("best_of_k", 1, "Explanations sampled per position.")
    optimize_temperature: float | None = bounded(
        "optimize_temperature", None, "Temperature of the best-of-k samples."
    )
    calculate_salience: bool = Field(True, description="Compute token_salience.")
    logit_lens: bool = Field(False, description="Add logit_lens_top to each row.")
    kl: bool = Field(False, description="Add kl to each row.")
    batch_size: int | None = bounded(
        "batch_size", None, "Positions per batch; default from the group file."
    )
    positions: list[NonNegativeInt] | None = Field(
        None, max_length=100_000, description="Token positions to analyse (default: all)."
    )
    last_n_messages: int | None = bounded(
        "last_n_messages", None, "Analyse only the tokens of the last N chat messages."
    )
    return_structured: bool = Field(False, description="Per-token explanation strings.")


class _TextOrMessages(_Request):
    text: str | None = Field(None, description="Plain text to analyse.")
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="Chat messages, rendered with the chat template.",
    )

    @model_validator(mode="after")
    def _one_input(self) -> _TextOrMessages:
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of `text` or `messages`")
        return self

    def input_length(self) -> int:
        """Characters of input text (all message contents for a chat)."""
        if self.text is not None:
            return len(self.text)
        return sum(len(message.content) for message in self.messages or [])

    def input_dict(self) -> dict[str, Any]:
        """`{"text": ...}` or `{"messages": [...]}`, as the group replica takes it."""
        if self.text is not None:
            return {"text": self.text}
        return {"messages": [message.model_dump() for message in self.messages or []]}


class AnalyzeRequest(_TextOrMessages):
    """Body of `POST /api/v2/lenses/{lens_id}/analyze`."""

    options: AnalyzeOptions = Field(default_factory=AnalyzeOptions)
    stream: bool = Field(False, description="Stream NDJSON progress, meta and rows.")

    def replica_body(self) -> dict[str, Any]:
        """Return the body `GroupServer.analyze` takes (options without unset fields)."""
        return {**self.input_dict(), "options": self.options.model_dump(exclude_unset=True)}


class GenerateRequest(_TextOrMessages):
    """Body of `POST /api/v2/lenses/{lens_id}/generate`."""

    max_new_tokens: int = bounded("max_new_tokens", 32, "Tokens per continuation.")
    temperature: float = bounded("temperature", 1.0, "0 = greedy.")
    seed: int | None = bounded("seed", None, "Random if absent.")
    num_continuations: int = bounded("num_continuations", 1, "Continuations to sample.")

    def replica_body(self) -> dict[str, Any]:
        """Return the body `GroupServer.generate` takes."""
        return {
            **self.input_dict(),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "num_continuations": self.num_continuations,
        }


class PreloadRequest(_Request):
    """Body of `POST /api/v2/groups/{group_id}/preload`; no body = every lens of the group."""

    lens_ids: list[str] | None = Field(
        None, min_length=1, max_length=1000, description="Lenses to load (default: all)."
    )


# --- responses -------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    """What failed: a stable code, one line, details."""

    code: str
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    """Every error response: `{"error": {"code", "message", "detail"}}`."""

    error: ErrorInfo


# Every route behind `require_api_key` can answer these (documented on each router).
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key."},
    429: {"model": ErrorBody, "description": "Rate limit reached; see Retry-After."},
}


class LogitLensEntry(_Response):
    """One of the top tokens of the LM head applied to the raw activation."""

    token: str
    token_id: int
    logit: float


class ResultRow(_Response):
    """LENS_FORMAT §Result row."""

    position: int
    token: str
    token_id: int
    explanation: str
    explanation_tokens: list[str]
    explanation_token_ids: list[int]
    mse: float
    relative_rmse: float
    token_salience: list[float] | None = None
    logit_lens_top: list[LogitLensEntry] | None = None
    kl: float | None = None


class AnalyzeMeta(_Response):
    """`meta` of an analysis; replicas add `replica_id` and `switch`."""

    lens_id: str
    group_id: str | None = None
    layer: int
    t_text: int
    base_model: str | None = None
    donor: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, Any] = Field(default_factory=dict)


class AnalyzeResponse(_Response):
    """`POST /api/v2/lenses/{lens_id}/analyze` (and `lens-serve analyze --json`)."""

    meta: AnalyzeMeta
    rows: list[ResultRow]


class Continuation(_Response):
    """One generated continuation."""

    text: str
    token_ids: list[int]


class GenerateResponse(_Response):
    """`POST /api/v2/lenses/{lens_id}/generate`."""

    meta: dict[str, Any]
    continuations: list[Continuation]


class Residency(_Response):
    """Where one replica holds a lens."""

    replica_id: str
    tier: Literal["device", "host"]


class LensInfo(_Response):
    """One lens in the groups list."""

    lens_id: str
    name: str
    layer: int
    t_text: int | None
    donor: str | None
    bytes: int | None = Field(description="Tensor bytes of the lens (None: unreadable).")
    visible: bool
    residency: list[Residency]
    status: Literal["available", "unavailable"] = Field(
        "available", description="`unavailable`: it failed to load; `reason` says why."
    )
    reason: ErrorInfo | None = Field(None, description="Why the lens is unavailable.")


class LensSizes(_Response):
    """Bytes that serving one lens involves."""

    lens_bytes: int | None
    checkpoint_file_bytes: int | None
    base_bytes: int
    donor_bytes: int


class LensDetail(LensInfo):
    """`GET /api/v2/lenses/{lens_id}`."""

    group_id: str
    sizes: LensSizes
    problem: str | None = Field(None, description="Why the checkpoint could not be read.")


class LensList(_Response):
    """`GET /api/v2/lenses`."""

    lenses: list[LensDetail]


class MemoryEstimate(_Response):
    """Bytes of a group: its base once, all its lenses, its donors."""

    base_bytes: int
    lens_bytes_total: int
    donor_bytes: int


class SwitchEstimate(_Response):
    """Expected seconds to switch to a lens from each tier, and to a cold group."""

    host: float
    disk: float
    cold: float
    source: Literal["measured", "estimated"] = Field(
        description="`measured` when any of the three comes from measured history"
    )
    sources: dict[str, Literal["measured", "estimated"]] = Field(
        default_factory=dict, description="Where each value comes from, by tier."
    )


class GroupInfo(_Response):
    """One group in `GET /api/v2/groups`."""

    group_id: str
    name: str
    description: str
    base_model: str
    memory_estimate: MemoryEstimate
    estimated_switch_seconds: SwitchEstimate
    replicas_running: int
    lenses: list[LensInfo]
    status: Literal["available", "unavailable"] = Field(
        "available", description="`unavailable`: its base cannot load; nothing in it serves."
    )
    reason: str | None = Field(None, description="Why the group is unavailable.")


class GroupList(_Response):
    """`GET /api/v2/groups`."""

    groups: list[GroupInfo]


class GroupStatus(_Response):
    """`GET /api/v2/groups/{group_id}/status`: every running replica."""

    group_id: str
    replicas: list[ReplicaStatus]


class PreloadItem(_Response):
    """The outcome of loading one lens."""

    lens_id: str
    ok: bool
    replica_id: str | None = None
    kind: str | None = None
    seconds: float | None = None
    bytes: int | None = None
    error: ErrorInfo | None = None


class PreloadResult(_Response):
    """`POST /api/v2/groups/{group_id}/preload` (JSON form)."""

    group_id: str
    results: list[PreloadItem]


class Health(_Response):
    """`/healthz` and `/readyz`."""

    status: str
    groups: list[str] = Field(default_factory=list, description="Groups that serve.")
    unavailable_groups: dict[str, str] = Field(
        default_factory=dict, description="Groups whose base cannot load, with the reason."
    )


# --- WebSocket messages (`WS /api/v2/ws`) -------------------------------------------------

MessageId = str | int | None


class WsAnalyze(AnalyzeRequest):
    """`{"type": "analyze", "id", "lens_id", "text"|"messages", "options"}`."""

    type: Literal["analyze"]
    id: MessageId = Field(None, description="Echoed in every reply to this message.")
    lens_id: str


class WsGenerate(GenerateRequest):
    """`{"type": "generate", "id", "lens_id", "text"|"messages", ...}`."""

    type: Literal["generate"]
    id: MessageId = None
    lens_id: str


class WsPreload(PreloadRequest):
    """`{"type": "preload", "id", "group_id", "lens_ids"?}`."""

    type: Literal["preload"]
    id: MessageId = None
    group_id: str


class WsCancel(_Request):
    """`{"type": "cancel", "id"}`: stop the running request with that id."""

    type: Literal["cancel"]
    id: MessageId = None


WsMessage = Annotated[WsAnalyze | WsGenerate | WsPreload | WsCancel, Field(discriminator="type")]
