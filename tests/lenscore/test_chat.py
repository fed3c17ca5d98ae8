"""`lenscore.reply`: one assistant turn from the activation model, on the demo bases."""

from pathlib import Path

import pytest

from lenscore import BadInput, Cancelled, Lens, generate, load_lens, reply
from lenscore.chat import end_of_turn_marker, render_reply_prompt, stop_token_ids

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def qwen_lens(demo_dir: Path, qwen_base) -> Lens:
    return load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base, lens_id="qwen2-tiny-l1")


@pytest.fixture(scope="module")
def gemma_lens(demo_dir: Path, gemma_base) -> Lens:
    return load_lens(demo_dir / "lenses" / "gemma2-tiny-l1", gemma_base, lens_id="gemma2-tiny-l1")


def test_end_of_turn_marker_comes_from_the_chat_template(qwen_base, gemma_base) -> None:
    assert end_of_turn_marker(qwen_base.tokenizer) == "<|im_end|>"
    assert end_of_turn_marker(gemma_base.tokenizer) == "<end_of_turn>"
    # Gemma's marker is one token; it stops a reply as soon as it is sampled.
    gemma_marker = end_of_turn_marker(gemma_base.tokenizer)
    ids = gemma_base.tokenizer(gemma_marker, add_special_tokens=False)["input_ids"]
    stops = stop_token_ids(gemma_base.tokenizer, gemma_marker)
    assert gemma_base.tokenizer.eos_token_id in stops
    if len(ids) == 1:
        assert ids[0] in stops


def test_prompt_ends_with_the_generation_prompt_and_the_prefill(qwen_base) -> None:
    prompt, used = render_reply_prompt(qwen_base.tokenizer, HELLO, "Sure,")
    assert prompt.endswith("<|im_start|>assistant\nSure,")
    assert used == "Sure,"
    # A chat ending with the assistant's turn continues it.
    chat = HELLO + [{"role": "assistant", "content": "Well"}]
    prompt, used = render_reply_prompt(qwen_base.tokenizer, chat, " then")
    assert prompt.endswith("<|im_start|>assistant\nWell then")
    assert used == "Well then"


@pytest.mark.parametrize("lens_name", ["qwen_lens", "gemma_lens"])
def test_greedy_reply_is_the_greedy_continuation_of_the_rendered_chat(
    lens_name: str, request: pytest.FixtureRequest
) -> None:
    lens = request.getfixturevalue(lens_name)
    out = reply(lens, HELLO, max_new_tokens=10, temperature=0, seed=1)
    prompt, _ = render_reply_prompt(lens.activation_model.tokenizer, HELLO, None)
    cont = generate(lens, text=prompt, max_new_tokens=10, temperature=0)["continuations"][0]
    n = len(out["token_ids"])
    assert out["token_ids"] == cont["token_ids"][:n], (out["token_ids"], cont["token_ids"])
    assert out["stop_reason"] in {"end_of_turn", "max_tokens"}
    if out["stop_reason"] == "max_tokens":
        assert n == 10


def test_a_seed_reproduces_a_sampled_reply(qwen_lens: Lens) -> None:
    first = reply(qwen_lens, HELLO, max_new_tokens=8, temperature=1.0, seed=7)
    again = reply(qwen_lens, HELLO, max_new_tokens=8, temperature=1.0, seed=7)
    assert first["token_ids"] == again["token_ids"]
    assert first["meta"]["seed"] == 7


def test_bad_input_and_cancellation(qwen_lens: Lens) -> None:
    with pytest.raises(BadInput):
        reply(qwen_lens, HELLO, max_new_tokens=0)
    with pytest.raises(BadInput):
        reply(qwen_lens, [{"role": "robot", "content": "x"}])
    with pytest.raises(BadInput):
        reply(qwen_lens, HELLO, temperature=3.0)
    with pytest.raises(Cancelled):
        reply(qwen_lens, HELLO, max_new_tokens=8, should_stop=lambda: True)
