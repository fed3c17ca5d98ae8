"""One assistant reply from a lens's activation model, stopping at the end of the turn.

Beside `analyze.generate` at the top of lenscore's data path: the chat is rendered with the
tokenizer's chat template and a generation prompt (LENS_FORMAT.md §Analysis input), then
tokens are sampled (the seed contract of `lenscore.sampling`) until the template's
end-of-turn marker or the tokenizer's end-of-sequence token.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from lenscore.base import Base
from lenscore.errors import BadInput, Cancelled
from lenscore.inputs import check_messages, check_unicode, tokenize_text
from lenscore.lens import Lens
from lenscore.options import AnalysisOptions
from lenscore.sampling import SampleKeys, choose_tokens, uniforms

MAX_REPLY_TOKENS = 4096
# A probe content whose rendering shows what the template writes after an assistant turn.
_PROBE = "lens-serve-end-of-turn-probe"
# Markers of common chat formats, used when the template itself names none.
_KNOWN_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def end_of_turn_marker(tokenizer: Any) -> str | None:
    """Return the text the chat template writes right after an assistant message, if any.

    `<|im_end|>` for ChatML templates, `<end_of_turn>` for Gemma's; None when the template
    writes nothing there (then only end-of-sequence ends a reply).
    """
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": _PROBE}]
    rendered = _apply_template(tokenizer, probe, add_generation_prompt=False)
    after = rendered.split(_PROBE, 1)[1] if _PROBE in rendered else ""
    first_line = after.strip().split("\n", 1)[0].strip()
    if first_line:
        return first_line.split()[0]
    vocab = tokenizer.get_vocab()
    return next((marker for marker in _KNOWN_MARKERS if marker in vocab), None)


def stop_token_ids(tokenizer: Any, marker: str | None) -> set[int]:
    """Token ids that end a reply: end-of-sequence and the marker when it is one token."""
    stops = set()
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    if marker is not None:
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            stops.add(int(ids[0]))
    return stops


def render_reply_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], prefill: str | None
) -> tuple[str, str]:
    """Render the chat up to the assistant's turn; return (prompt text, prefill used).

    A chat whose last message is the assistant's continues that message (its content is
    the prefill, and `prefill` is appended to it).

    Raises:
        BadInput: malformed messages, no chat template, or the template refuses them.

    """
    check_messages(messages)
    if prefill is not None:
        if not isinstance(prefill, str):
            raise BadInput("prefill must be a string")
        check_unicode(prefill, "prefill")
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput("this base's tokenizer has no chat template: use generate with `text`")
    if messages[-1]["role"] == "assistant":
        head, last = messages[:-1], messages[-1]["content"]
        if not head:
            raise BadInput("messages must hold a turn before the assistant's")
        prompt = _apply_template(tokenizer, head, add_generation_prompt=True)
        used = last + (prefill or "")
    else:
        prompt = _apply_template(tokenizer, messages, add_generation_prompt=True)
        used = prefill or ""
    return prompt + used, used


def _apply_template(
    tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool
) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except (TemplateError, ValueError, TypeError) as exc:
        raise BadInput(f"the chat template refused these messages: {exc}") from exc


def reply(
    lens: Lens,
    messages: list[dict[str, Any]],
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    seed: int | None = None,
    prefill: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Sample one assistant reply to `messages` from the lens's activation model.

    The reply ends at the template's end-of-turn marker or end-of-sequence token (neither
    is part of `response`), or after `max_new_tokens`. Step i draws with key (seed, 0, 0)
    at step i, so a seed reproduces the reply.

    Returns:
        `{"meta", "response", "prefill", "token_ids", "stop_reason"}`; `response` holds the
        new text only (after `prefill`), `stop_reason` is `end_of_turn` or `max_tokens`.

    Raises:
        BadInput: bad messages or bounds (max_new_tokens 1..4096, temperature 0..2).
        Cancelled: `should_stop` answered True between tokens.

    """
    if not (isinstance(max_new_tokens, int) and 1 <= max_new_tokens <= MAX_REPLY_TOKENS):
        raise BadInput(f"max_new_tokens must be an integer within 1..{MAX_REPLY_TOKENS}")
    AnalysisOptions(temperature=temperature, seed=seed).validate()
    model = lens.activation_model
    tokenizer = model.tokenizer
    prompt, used_prefill = render_reply_prompt(tokenizer, messages, prefill)
    marker = end_of_turn_marker(tokenizer)
    stops = stop_token_ids(tokenizer, marker)
    seed = seed if seed is not None else int.from_bytes(os.urandom(7), "big")
    started = time.perf_counter()
    ids = tokenize_text(tokenizer, prompt)
    new_ids, stop_reason = _sample_reply(
        model, ids, max_new_tokens, temperature, seed, (stops, marker), should_stop
    )
    text = tokenizer.decode(new_ids, skip_special_tokens=False)
    if marker is not None and marker in text:
        text = text[: text.index(marker)]
        stop_reason = "end_of_turn"
    meta = {
        "lens_id": lens.lens_id,
        "seed": seed,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "prompt_tokens": len(ids),
        "timings": {"total_seconds": round(time.perf_counter() - started, 6)},
    }
    return {
        "meta": meta,
        "response": text,
        "prefill": used_prefill,
        "token_ids": new_ids,
        "stop_reason": stop_reason,
    }


def _sample_reply(
    model: Base,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    stop: tuple[set[int], str | None],
    should_stop: Callable[[], bool] | None,
) -> tuple[list[int], str]:
    """Sample up to `max_new_tokens` ids; return them (the stop token left out) and why."""
    stops, marker = stop
    tokenizer = model.tokenizer
    u = uniforms(SampleKeys.grid(seed, [0], 1, model.device), max_new_tokens)  # [1, steps]
    out: list[int] = []
    with torch.no_grad():
        hidden, cache = model.run_inner(torch.tensor([ids], device=model.device), use_cache=True)
        for step in range(max_new_tokens):
            if should_stop is not None and should_stop():
                raise Cancelled("the reply was cancelled")
            logits = model.logits(hidden[:, -1], softcap=True)  # [1, vocab]
            chosen = choose_tokens(logits, temperature, u[:, step])  # [1]
            token = int(chosen[0])
            if token in stops:
                return out, "end_of_turn"
            out.append(token)
            if marker is not None and _ends_with_marker(tokenizer, out, marker):
                return out, "end_of_turn"
            if step + 1 < max_new_tokens:
                hidden, cache = model.run_inner(chosen[:, None], cache=cache, use_cache=True)
    return out, "max_tokens"


def _ends_with_marker(tokenizer: Any, ids: list[int], marker: str) -> bool:
    # A marker that is no single token arrives in pieces: look at the last few tokens only.
    tail = tokenizer.decode(ids[-(len(marker) + 2) :], skip_special_tokens=False)
    return marker in tail
