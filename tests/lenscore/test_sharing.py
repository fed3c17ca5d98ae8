"""Issue 12: shared prompt passes and counter-based sampling change no result.

The shared path (left prompt once per batch, slot + right prompt once per position, cache
expanded to the k samples; encoder soft prompt once per call) is compared with the unshared
reference path and with a no-cache recompute; sampled rows are compared across batch
layouts. T > 0 comparisons hold unless a draw lands within float rounding of a CDF boundary
(measured ~1e-5 per draw on the demo lenses), so the draw counts here stay small.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from lenscore import AnalysisOptions, analyze, generate, load_base, load_lens
from lenscore.decode import decode, prompt_embeds
from lenscore.encode import encode
from lenscore.sampling import SampleKeys, choose_tokens, uniforms

TEXT = "The farmers planted wheat in the valley, and the river ran past the old mill."
LENSES = {
    "qwen2-tiny-l1": "qwen2-tiny",
    "qwen2-tiny-l2-first2": "qwen2-tiny",
    "qwen2-tiny-l0-single": "qwen2-tiny",
    "gemma2-tiny-l1": "gemma2-tiny",
    "gemma2-tiny-l2-input": "gemma2-tiny",
    "gemma2-tiny-l0-first1": "gemma2-tiny",
}


@pytest.fixture(scope="module")
def small_window_gemma(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo Gemma 2 base with a 4-token window: shorter than every prompt part."""
    out = tmp_path_factory.mktemp("gemma-window4") / "gemma2-tiny"
    shutil.copytree(demo_dir / "bases" / "gemma2-tiny", out)
    config = json.loads((out / "config.json").read_text())
    config["sliding_window"] = 4
    (out / "config.json").write_text(json.dumps(config))
    return load_base(out)


def lens_and_acts(demo_dir, bases, lens_id, text=TEXT):
    base = bases[LENSES[lens_id]]
    lens = load_lens(demo_dir / "lenses" / lens_id, base)
    ids = torch.tensor([base.tokenizer(text)["input_ids"]])
    return lens, ids, base.capture(ids, lens.config.layer_l)[0]


@pytest.fixture(scope="module")
def bases(qwen_base, gemma_base):
    return {"qwen2-tiny": qwen_base, "gemma2-tiny": gemma_base}


@pytest.mark.parametrize("lens_id", sorted(LENSES))
def test_shared_prompt_decoding_equals_the_unshared_path(demo_dir, bases, lens_id):
    lens, _, acts = lens_and_acts(demo_dir, bases, lens_id)
    greedy = decode(lens, acts, temperature=0)
    assert torch.equal(greedy, decode(lens, acts, temperature=0, shared=False))
    acts = acts[:5]
    keys = SampleKeys.grid(11, range(5), 4)
    shared = decode(lens, acts, temperature=1.0, keys=keys, repeats=4)
    unshared = decode(lens, acts, temperature=1.0, keys=keys, repeats=4, shared=False)
    assert shared.shape == (20, lens.config.t_text)
    assert torch.equal(shared, unshared), (shared != unshared).nonzero()
    # A real draw: the samples of one position are not all equal.
    assert len({tuple(row) for row in shared.tolist()}) > 5


@pytest.mark.parametrize("lens_id", sorted(LENSES))
def test_shared_soft_prompt_encoding_equals_the_unshared_path(demo_dir, bases, lens_id):
    lens, ids, acts = lens_and_acts(demo_dir, bases, lens_id)
    expl = decode(lens, acts, temperature=0)
    shared = encode(lens, expl, ids[0])
    unshared = encode(lens, expl, ids[0], shared=False)
    assert torch.allclose(shared, unshared, rtol=1e-5, atol=1e-5 * unshared.abs().max())


@pytest.mark.parametrize("lens_id", ["qwen2-tiny-l1", "gemma2-tiny-l1"])
def test_analysis_rows_equal_the_unshared_reference(demo_dir, bases, lens_id):
    lens, _, _ = lens_and_acts(demo_dir, bases, lens_id)
    opts = AnalysisOptions(temperature=1.0, seed=5, best_of_k=3, positions=tuple(range(8)))
    shared = analyze(lens, text=TEXT, options=opts)["rows"]
    unshared = analyze(lens, text=TEXT, options=opts, shared=False)["rows"]
    for mine, ref in zip(shared, unshared, strict=True):
        assert mine["explanation_token_ids"] == ref["explanation_token_ids"], mine["position"]
        assert mine["mse"] == pytest.approx(ref["mse"], rel=1e-5)
        assert mine["token_salience"] == pytest.approx(ref["token_salience"], rel=1e-4, abs=1e-5)


def test_a_sample_does_not_depend_on_batch_composition_or_other_positions_k(demo_dir, bases):
    lens, _, acts = lens_and_acts(demo_dir, bases, "gemma2-tiny-l1")
    picks = [1, 4, 6, 9]
    counts = torch.tensor([2, 5, 1, 3])
    keys = SampleKeys.grid(21, picks, counts.tolist())
    mixed = decode(lens, acts[picks], temperature=0.9, keys=keys, repeats=counts)  # [11, t]
    rows = mixed.split(counts.tolist())
    for i, position in enumerate(picks):
        # The same position alone, with more samples, and inside another batch order.
        alone = decode(
            lens,
            acts[[position]],
            temperature=0.9,
            keys=SampleKeys.grid(21, [position], 6),
            repeats=6,
        )
        assert torch.equal(alone[: counts[i]], rows[i]), position
    others = [9, 0, 4]
    reordered = decode(
        lens, acts[others], temperature=0.9, keys=SampleKeys.grid(21, others, 5), repeats=5
    )
    assert torch.equal(reordered[10:15], rows[1])  # position 4, samples 0..4


def test_best_of_one_is_sample_zero_of_best_of_k(demo_dir, bases):
    lens, _, _ = lens_and_acts(demo_dir, bases, "qwen2-tiny-l1")
    base_opts = {"temperature": 0.8, "seed": 4, "calculate_salience": False}
    one = analyze(lens, text=TEXT, options=AnalysisOptions(**base_opts))["rows"]
    best = analyze(lens, text=TEXT, options=AnalysisOptions(**base_opts, best_of_k=5))["rows"]
    assert all(b["mse"] <= o["mse"] for o, b in zip(one, best, strict=True))
    assert any(b["mse"] < o["mse"] for o, b in zip(one, best, strict=True))


def recompute(lens, act: torch.Tensor, u: torch.Tensor | None, temperature: float) -> list[int]:
    """Explanation of one activation with a full forward per token: no KV cache at all."""
    base, cfg = lens.base, lens.config
    weight, bias = lens.tensors["dec_proj_weight"], lens.tensors["dec_proj_bias"]
    slots = [weight @ act + bias] if weight.dim() == 2 else list(weight @ act + bias)
    embed_pos = lens.tensors["prompt_left"].shape[0]

    def patch_for(layer):
        value = slots[cfg.projection_index(layer) if len(slots) > 1 else 0]

        def patch(hidden):
            hidden = hidden.clone()
            hidden[:, embed_pos] = value
            return hidden

        return patch

    prompt = prompt_embeds(lens, slots[0][None])  # [1, Lp+1+Rp, d], scaled
    plan = {i: patch_for(i) for i in range(cfg.patched_layers(len(base.layers)))}
    chosen: list[int] = []
    for step in range(cfg.t_text):
        rows = [prompt]
        if chosen:
            rows.append(base.embed_ids(torch.tensor([chosen])))
        with torch.no_grad(), base.hooked(pre=plan):
            hidden = base.inner(inputs_embeds=torch.cat(rows, dim=1), use_cache=False)
        logits = base.logits(hidden.last_hidden_state[:, -1])
        draw = None if u is None else u[step : step + 1]
        chosen.append(int(choose_tokens(logits, temperature, draw)[0]))
    return chosen


@pytest.mark.parametrize("lens_id", ["gemma2-tiny-l1", "gemma2-tiny-l0-first1"])
def test_gemma2_sliding_window_cache_expansion_equals_a_no_cache_recompute(
    demo_dir, small_window_gemma, gemma_base, lens_id
):
    lens = load_lens(demo_dir / "lenses" / lens_id, small_window_gemma)
    assert lens.tensors["prompt_left"].shape[0] > 4  # the shared prefix overflows the window
    ids = torch.tensor([small_window_gemma.tokenizer(TEXT)["input_ids"]])
    acts = small_window_gemma.capture(ids, lens.config.layer_l)[0][:5]
    greedy = decode(lens, acts, temperature=0)
    assert greedy.tolist() == [recompute(lens, a, None, 0.0) for a in acts]
    keys = SampleKeys.grid(8, range(5), 3)
    sampled = decode(lens, acts, temperature=1.0, keys=keys, repeats=3)  # [15, t]
    u = uniforms(keys, lens.config.t_text)
    want = [recompute(lens, acts[r // 3], u[r], 1.0) for r in range(15)]
    assert sampled.tolist() == want
    # The window really bites: with the demo's 16-token window the explanations differ.
    wide = load_lens(demo_dir / "lenses" / lens_id, gemma_base)
    assert not torch.equal(greedy, decode(wide, acts, temperature=0))


def test_expanded_sliding_window_cache_keeps_layer_kinds_and_rows(small_window_gemma):
    from lenscore.base import expand_cache

    base = small_window_gemma
    embeds = base.embed_ids(torch.arange(3, 13)[None])[0]  # [10, d]
    cache = base.cache_prefix(embeds, 3)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["DynamicSlidingWindowLayer", "DynamicLayer", "DynamicSlidingWindowLayer"]
    assert cache.layers[0].keys.shape[0] == 3 and cache.layers[0].keys.shape[2] == 3  # window-1
    assert cache.layers[1].keys.shape[2] == 10 and cache.get_seq_length() == 10
    expand_cache(cache, torch.tensor([0, 0, 2, 1]))
    for layer in cache.layers:
        assert layer.keys.shape[0] == 4 and torch.equal(layer.keys[0], layer.keys[3])


def test_uniforms_depend_only_on_their_keys():
    keys = SampleKeys.grid(5, [3, 9, 4], [2, 0, 3])
    assert keys.position.tolist() == [3, 3, 4, 4, 4]
    assert keys.sample.tolist() == [0, 1, 0, 1, 2]
    a = uniforms(SampleKeys.grid(2**63 - 1, [0, 7, 2**32 - 1], 3), 4)
    b = uniforms(SampleKeys.grid(2**63 - 1, [2**32 - 1], [3]), 6)
    assert torch.equal(a[6:], b[:, :4])
    assert a.dtype == torch.float64 and ((a >= 0) & (a < 1)).all()
    many = uniforms(SampleKeys.grid(0, range(2000), 4), 8).flatten()
    assert many.unique().numel() == many.numel()
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float(many.std()) - 12**-0.5) < 0.01
    other_seed = uniforms(SampleKeys.grid(1, range(2000), 4), 8).flatten()
    assert (many != other_seed).all()


def test_inverse_cdf_draws_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, -30.0]]).expand(40_000, -1)
    temperature = 0.7
    u = uniforms(SampleKeys.grid(3, range(40_000), 1), 1)[:, 0]
    picks = choose_tokens(logits, temperature, u)
    freq = torch.bincount(picks, minlength=5).double() / 40_000
    want = torch.softmax(logits[0].double() / temperature, dim=-1)
    assert torch.allclose(freq, want, atol=0.01)
    assert freq[4] == 0


def test_per_row_temperatures_and_the_greedy_limit():
    logits = torch.tensor([[0.0, 1.0, 0.5], [3.0, 0.0, 2.9], [0.0, 1.0, 0.5]])
    u = torch.tensor([0.0, 0.999, 0.999], dtype=torch.float64)
    temps = torch.tensor([0.0, 1.0, 6.1e-249])  # 6.1e-249 is 0 in float32: the argmax
    assert choose_tokens(logits, temps, u).tolist() == [1, 2, 1]
    assert choose_tokens(logits, 0.0, u).tolist() == [1, 0, 1]
    assert choose_tokens(logits, 1.0, torch.zeros(3, dtype=torch.float64)).tolist() == [0, 0, 0]


def test_a_continuation_does_not_depend_on_how_many_are_drawn(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    three = generate(lens, text=TEXT, max_new_tokens=6, seed=9, num_continuations=3)
    one = generate(lens, text=TEXT, max_new_tokens=6, seed=9, num_continuations=1)
    conts = [c["token_ids"] for c in three["continuations"]]
    assert conts[0] == one["continuations"][0]["token_ids"]
    assert len({tuple(c) for c in conts}) == 3
    greedy = generate(lens, text=TEXT, max_new_tokens=6, temperature=0, num_continuations=2)
    ids = qwen_base.tokenizer(TEXT)["input_ids"]
    want: list[int] = []
    for _ in range(6):  # no cache: a full forward per token
        with torch.no_grad():
            logits = qwen_base.model(input_ids=torch.tensor([ids + want])).logits
        want.append(int(logits[0, -1].argmax()))
    assert greedy["continuations"][0]["token_ids"] == want
    assert greedy["continuations"][1] == greedy["continuations"][0]
