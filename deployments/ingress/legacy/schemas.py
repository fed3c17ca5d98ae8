"""Request bodies of the old backend's clients, with its field names, bounds and defaults.

Read by the legacy adapters (`rest.py`, `slim.py`, `ws.py`). Unlike v2's bodies these
ignore unknown keys, as the old backend's did, so old scripts keep working; `mapping.py`
turns them into v2 bodies and reports options lens-serve does not implement.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.ingress.schemas import MAX_SEED

# The old backend's defaults (its `models.py`, `slim_api.py` and documentation).
DEFAULT_SEED = 42
DEFAULT_BEST_OF_K = 8
AUTO_BATCH_SIZE_MAX = 256


class _Legacy(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OptimizeExplanationsConfig(_Legacy):
    """Best-of-k settings; only `best_of_k` and `temperature` change what lens-serve does."""

    best_of_k: int = Field(DEFAULT_BEST_OF_K, ge=1, le=64, description="Samples per position.")
    temperature: float = Field(1.0, ge=0, le=2.0, description="Temperature of the samples.")
    use_batched: bool = True
    n_groups_per_rollout: int | None = Field(None, description="Ignored (batching).")
    rollout_batch_size: int | None = Field(None, description="Ignored (batching).")
    num_samples_per_iteration: int | None = Field(None, description="Ignored.")
    salience_pct_threshold: float | None = Field(None, description="Ignored.")
    num_samples: int | None = Field(None, description="Ignored.")


class LegacyAnalyzeOptions(_Legacy):
    """`options` of the old `POST /analyze` and `/ws` `analyze` (old names and defaults).

    The lower temperature bound is 0 (the old one was 0.1): 0 is greedy, as in v2.
    """

    batch_size: int | None = Field(None, ge=1, description="Ignored: results never depend on it.")
    seed: int = Field(DEFAULT_SEED, ge=0, le=MAX_SEED)
    no_eval: bool = Field(False, description="Skip KL (MSE is always computed).")
    tuned_lens: bool = Field(False, description="Not available: tuned_lens_top stays null.")
    use_tuned_lens: bool = Field(False, description="Same as tuned_lens.")
    logit_lens_analysis: bool = Field(False, description="Add logit_lens_top.")
    use_logit_lens: bool = Field(False, description="Same as logit_lens_analysis.")
    temperature: float = Field(1.0, ge=0, le=2.0)
    do_hard_tokens: bool = Field(False, description="Not available.")
    return_structured: bool = Field(True, description="Add explanation_structured.")
    move_devices: bool = Field(False, description="Ignored.")
    no_kl: bool = Field(False, description="Skip kl_divergence.")
    calculate_salience: bool = True
    calculate_token_salience: bool = True
    add_tokens: list[str] | None = Field(None, description="Not available.")
    replace_left: str | None = Field(None, description="Not available.")
    replace_right: str | None = Field(None, description="Not available.")
    optimize_explanations_config: OptimizeExplanationsConfig | None = Field(
        default_factory=OptimizeExplanationsConfig
    )
    last_n_messages: int | None = Field(None, ge=1)
    is_chat: bool = Field(False, description="The text is a JSON list of chat messages.")
    use_chat_format: bool = Field(False, description="Apply the chat template to the text.")
    model_id: str | None = Field(None, description="Lens id (the old backend's model id).")


class LegacyAnalyzeRequest(_Legacy):
    """Body of the old `POST /analyze`."""

    text: str = Field(min_length=1, description="Text (or a JSON chat, with is_chat).")
    options: LegacyAnalyzeOptions = Field(default_factory=LegacyAnalyzeOptions)
    model_id: str | None = Field(None, description="Lens id; default: the first lens.")


class LegacyGenerateOptions(_Legacy):
    """`options` of the old `/ws` `generate` message."""

    num_tokens: int | None = Field(None, ge=1, le=1024)
    max_new_tokens: int | None = Field(None, ge=1, le=1024)
    num_completions: int = Field(3, ge=1, le=16)
    temperature: float = Field(0.8, ge=0, le=2.0)
    is_chat: bool = False
    use_chat_format: bool = False
    return_full_text: bool = True
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    model_id: str | None = None


class SlimMessage(_Legacy):
    """One chat message of the slim API."""

    role: Literal["system", "user", "assistant"]
    content: str


class _SlimRequest(_Legacy):
    messages: list[SlimMessage] = Field(min_length=1, max_length=1000)
    model_group: str = Field(description="Group id; its first lens unless model_id is given.")
    model_id: str | None = Field(None, description="Lens id within the group.")


class SlimGenerateRequest(_SlimRequest):
    """Body of `POST /api/slim/generate`."""

    temperature: float = Field(1.0, ge=0.1, le=2.0)
    n_continuations: int = Field(1, ge=1, le=10)
    n_tokens: int = Field(100, ge=1, le=512)


class SlimAnalyzeRequest(_SlimRequest):
    """Body of `POST /api/slim/analyze`."""

    calculate_token_salience: bool = True
    best_of_k: int = Field(DEFAULT_BEST_OF_K, ge=1, le=32)
    last_n_messages: int | None = Field(None, ge=1)


class SlimSendMessageRequest(_SlimRequest):
    """Body of `POST /api/slim/send_message`."""

    temperature: float = Field(1.0, ge=0.1, le=2.0)
    max_tokens: int = Field(1024, ge=1, le=4096)


class Queued(BaseModel):
    """What the old routes answer to a submission."""

    request_id: str
    status: str
    queue_position: int | None = None
    queue_size: int | None = None
    message: str | None = None
