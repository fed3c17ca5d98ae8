"""Turn request text or chat messages into the token ids a lens analyses.

LENS_FORMAT.md §Analysis input: the tokenizer adds BOS, a doubled leading BOS is dropped,
chat messages go through the tokenizer's chat template first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lenscore.errors import BadInput

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Tokens:
    """The analysed token ids and the first position each trailing message starts at."""

    ids: list[int]
    message_starts: list[int]


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of a plain text, BOS added once even when the text starts with the BOS string."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def render_messages(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """Render chat messages to text with the tokenizer's chat template.

    Raises:
        BadInput: malformed messages, or the tokenizer has no chat template.

    """
    check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput("this base's tokenizer has no chat template: send `text` instead")
    last_is_user = messages[-1]["role"] == "user"
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=last_is_user,
        continue_final_message=not last_is_user,
    )


def check_messages(messages: Any) -> None:
    """Raise BadInput unless `messages` is a non-empty list of {role, content} strings."""
    if not isinstance(messages, list) or not messages:
        raise BadInput("messages must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise BadInput(f"messages[{index}] must have exactly the keys role and content")
        if message["role"] not in ROLES:
            raise BadInput(f"messages[{index}].role must be one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise BadInput(f"messages[{index}].content must be a string")
        check_unicode(message["content"], f"messages[{index}].content")


def check_unicode(text: str, where: str) -> None:
    """Raise BadInput when `text` cannot be UTF-8 encoded (it holds an unpaired surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadInput(
            f"{where} is not valid Unicode: unpaired surrogate at character {exc.start}",
            {"field": where, "position": exc.start},
        ) from None


def tokenize_input(
    tokenizer: Any, text: str | None = None, messages: list[dict[str, Any]] | None = None
) -> Tokens:
    """Token ids of `text` or `messages` (exactly one), with message start positions.

    Raises:
        BadInput: neither or both given, or fewer than 2 tokens.

    """
    if (text is None) == (messages is None):
        raise BadInput("give exactly one of text or messages")
    if text is not None:
        if not isinstance(text, str):
            raise BadInput("text must be a string")
        check_unicode(text, "text")
        ids = tokenize_text(tokenizer, text)
        starts = [0]
    else:
        ids = tokenize_text(tokenizer, render_messages(tokenizer, messages))
        starts = _message_starts(tokenizer, messages, len(ids))
    if len(ids) < 2:
        raise BadInput(f"the input has {len(ids)} token(s); at least 2 are needed")
    return Tokens(ids=ids, message_starts=starts)


def _message_starts(tokenizer: Any, messages: list[dict[str, Any]], total: int) -> list[int]:
    # Position where message i begins = token count of the rendering of messages[:i].
    starts = [0]
    for cut in range(1, len(messages)):
        prefix = tokenizer.apply_chat_template(messages[:cut], tokenize=False)
        starts.append(min(len(tokenize_text(tokenizer, prefix)), total))
    return starts
