"""The lens math checked against computations written from LENS_FORMAT.md, not lenscore."""

import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lenscore import AnalysisOptions, BadInput, Cancelled, analyze, load_lens
from lenscore.decode import decode
from lenscore.encode import encode

TEXT = "The farmers planted wheat in the valley, and the river ran past the old mill."


def hf_block_outputs(base, ids: torch.Tensor) -> list[torch.Tensor]:
    """Output of every block from a plain HF forward (the last one recovered un-normed)."""
    out = base.model(input_ids=ids, output_hidden_states=True)
    return list(out.hidden_states[1:])


def test_captured_activation_is_the_block_output(qwen_base, gemma_base):
    for base in (qwen_base, gemma_base):
        ids = torch.tensor([base.tokenizer(TEXT)["input_ids"]])
        hidden = hf_block_outputs(base, ids)
        n = len(base.layers)
        for layer in range(n - 1):
            assert torch.equal(base.capture(ids, layer), hidden[layer])
        # HF's last hidden state is final-normed: the capture is the state before that norm.
        last = base.capture(ids, n - 1)
        assert not torch.allclose(last, hidden[-1])
        assert torch.allclose(base.inner.norm(last), hidden[-1], atol=1e-5)


def manual_greedy(lens, act: torch.Tensor) -> list[int]:
    """Greedy explanation without KV cache: full recompute per token, patching by hand."""
    base, cfg, t = lens.base, lens.config, lens.tensors
    inner = base.inner
    weight, bias = t["dec_proj_weight"], t["dec_proj_bias"]

    def slot(row: int) -> torch.Tensor:
        if weight.dim() == 2:
            return weight @ act + bias
        return weight[row] @ act + bias[row]

    left, right = t["prompt_left"], t["prompt_right"]
    embed_pos = left.shape[0]
    patched = cfg.patched_layers(len(inner.layers))
    prompt = torch.cat([left, slot(0)[None], right])  # Qwen2: embedding scale 1
    chosen: list[int] = []
    for _ in range(cfg.t_text):
        rows = [prompt]
        if chosen:
            rows.append(inner.embed_tokens(torch.tensor(chosen)))
        h = torch.cat(rows)[None]
        pos = torch.arange(h.shape[1])[None]
        rope = inner.rotary_emb(h, pos)
        for i, layer in enumerate(inner.layers):
            if i < patched:
                h = h.clone()
                h[0, embed_pos] = slot(i + 1 if cfg.new_decoder else i)
            h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        logits = base.lm_head(inner.norm(h))[0, -1]
        chosen.append(int(logits.argmax()))
    return chosen


@pytest.mark.parametrize(
    "lens_id", ["qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l0-single"]
)
def test_slot_patching_with_known_projections_matches_manual_layers(demo_dir, qwen_base, lens_id):
    lens = load_lens(demo_dir / "lenses" / lens_id, qwen_base)
    gen = torch.Generator().manual_seed(5)
    w = lens.tensors["dec_proj_weight"]
    # Known matrices: a distinct scaled identity plus a fixed random part per slot.
    scales = torch.arange(1, w.shape[0] + 1 if w.dim() == 3 else 2, dtype=torch.float32)
    known = torch.eye(64) * scales.view(-1, 1, 1) + 0.1 * torch.randn(
        len(scales), 64, 64, generator=gen
    )
    lens.tensors["dec_proj_weight"] = known if w.dim() == 3 else known[0]
    lens.tensors["dec_proj_bias"] = torch.randn(lens.tensors["dec_proj_bias"].shape, generator=gen)
    ids = torch.tensor([qwen_base.tokenizer(TEXT)["input_ids"]])
    acts = qwen_base.capture(ids, lens.config.layer_l)[0][:6]
    got = decode(lens, acts, temperature=0)
    want = [manual_greedy(lens, a) for a in acts]
    assert got.tolist() == want


def test_mse_with_a_hand_set_encoder(demo_dir, gemma_base):
    lens = load_lens(demo_dir / "lenses" / "gemma2-tiny-l1", gemma_base)
    target = torch.linspace(-1, 1, 64)
    lens.tensors["enc_proj_weight"] = torch.zeros(64, 64)
    lens.tensors["enc_proj_bias"] = target.clone()  # Â = target whatever the explanation
    result = analyze(lens, text=TEXT, options=AnalysisOptions(temperature=0))
    ids = torch.tensor([gemma_base.tokenizer(TEXT)["input_ids"]])
    acts = hf_block_outputs(gemma_base, ids)[1][0]
    for row in result["rows"]:
        a = acts[row["position"]]
        mse = float(((a - target) ** 2).mean())
        assert row["mse"] == pytest.approx(mse, rel=1e-6)
        assert row["relative_rmse"] == pytest.approx(
            mse**0.5 / float(a.pow(2).mean()) ** 0.5, rel=1e-6
        )
        assert row["token_salience"] == [0.0] * lens.config.t_text  # Â ignores the text


def test_salience_blanks_one_token_at_a_time(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    result = analyze(lens, text=TEXT, options=AnalysisOptions(temperature=0, positions=(3, 7)))
    null = qwen_base.tokenizer.encode(" ", add_special_tokens=False)[0]
    ids = torch.tensor([qwen_base.tokenizer(TEXT)["input_ids"]])
    acts = hf_block_outputs(qwen_base, ids)[1][0]
    for row in result["rows"]:
        a, cur = acts[row["position"]], torch.tensor([row["token_id"]])
        expl = torch.tensor([row["explanation_token_ids"]])
        base_mse = float(((a - encode(lens, expl, cur)[0]) ** 2).mean())
        assert row["mse"] == pytest.approx(base_mse, rel=1e-6)
        for i, score in enumerate(row["token_salience"]):
            blank = expl.clone()
            blank[0, i] = null
            mse_i = float(((a - encode(lens, blank, cur)[0]) ** 2).mean())
            want = 0.0 if expl[0, i] == null else (mse_i - base_mse) / (base_mse + 1e-9)
            assert score == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_logit_lens_reads_the_raw_activation(demo_dir, qwen_base, qwen_donor):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1-donor", qwen_base, donor=qwen_donor)
    result = analyze(
        lens,
        text=TEXT,
        options=AnalysisOptions(temperature=0, logit_lens=True, calculate_salience=False),
    )
    ids = torch.tensor([qwen_base.tokenizer(TEXT)["input_ids"]])
    acts = hf_block_outputs(qwen_donor, ids)[1][0]  # the donor's activations, not the base's
    for row in result["rows"]:
        logits = qwen_donor.model.lm_head(acts[row["position"]])
        top = logits.topk(min(lens.config.t_text, 10))
        assert [e["token_id"] for e in row["logit_lens_top"]] == top.indices.tolist()


def test_kl_at_the_last_layer_equals_the_head_on_the_reconstruction(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l2-first2", qwen_base)  # last block
    result = analyze(lens, text=TEXT, options=AnalysisOptions(temperature=0, kl=True, batch_size=5))
    ids = torch.tensor([qwen_base.tokenizer(TEXT)["input_ids"]])
    ref = F.log_softmax(qwen_base.model(input_ids=ids).logits[0], dim=-1)
    for row in result["rows"]:
        expl = torch.tensor([row["explanation_token_ids"]])
        recon = encode(lens, expl, torch.tensor([row["token_id"]]))[0]
        # After the last block only the final norm and head act on the patched position.
        patched = F.log_softmax(qwen_base.lm_head(qwen_base.inner.norm(recon)), dim=-1)
        p = ref[row["position"]]
        kl = float((p.exp() * (p - patched)).sum())
        assert row["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("lens_id", ["qwen2-tiny-l1", "gemma2-tiny-l2-input"])
def test_greedy_results_do_not_depend_on_batch_size_or_run(
    demo_dir, qwen_base, gemma_base, lens_id
):
    base = qwen_base if lens_id.startswith("qwen") else gemma_base
    lens = load_lens(demo_dir / "lenses" / lens_id, base)
    runs = [
        analyze(lens, text=TEXT, options=AnalysisOptions(temperature=0, batch_size=b))
        for b in (1, 4, 64, 64)
    ]
    ids = [[r["explanation_token_ids"] for r in run["rows"]] for run in runs]
    assert ids[0] == ids[1] == ids[2] == ids[3]
    mses = [[r["mse"] for r in run["rows"]] for run in runs]
    assert mses[2] == mses[3]
    assert mses[0] == pytest.approx(mses[2], rel=1e-5)


def test_seeded_sampling_does_not_depend_on_batch_size(demo_dir, gemma_base):
    lens = load_lens(demo_dir / "lenses" / "gemma2-tiny-l1", gemma_base)

    def run(batch: int, seed: int, k: int = 1):
        opts = AnalysisOptions(
            temperature=1.0, seed=seed, batch_size=batch, best_of_k=k, calculate_salience=False
        )
        return [r["explanation_token_ids"] for r in analyze(lens, text=TEXT, options=opts)["rows"]]

    assert run(1, 7) == run(5, 7) == run(100, 7)
    assert run(1, 7) != run(1, 8)
    assert run(2, 7, k=3) == run(7, 7, k=3)


def test_best_of_k_never_does_worse_than_its_first_sample(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    one = analyze(lens, text=TEXT, options=AnalysisOptions(temperature=1.0, seed=3))
    best = analyze(lens, text=TEXT, options=AnalysisOptions(temperature=1.0, seed=3, best_of_k=6))
    pairs = list(zip(one["rows"], best["rows"], strict=True))
    assert all(b["mse"] <= o["mse"] + 1e-6 for o, b in pairs)
    assert any(b["mse"] < o["mse"] for o, b in pairs)


def test_lenses_share_one_base_object_and_storage(demo_dir, qwen_base, qwen_donor):
    lenses = [
        load_lens(demo_dir / "lenses" / i, qwen_base)
        for i in ("qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l0-single")
    ]
    lenses.append(
        load_lens(demo_dir / "lenses" / "qwen2-tiny-l1-donor", qwen_base, donor=qwen_donor)
    )
    ptr = qwen_base.model.get_input_embeddings().weight.data_ptr()
    base_ptrs = {p.data_ptr() for p in qwen_base.model.parameters()}
    for lens in lenses:
        assert lens.base is qwen_base
        assert lens.base.model.get_input_embeddings().weight.data_ptr() == ptr
        assert not base_ptrs & {t.data_ptr() for t in lens.tensors.values()}
        assert lens.nbytes < qwen_base.nbytes / 2
    assert lenses[-1].donor is qwen_donor and lenses[-1].activation_model is qwen_donor


def test_moving_a_lens_moves_only_its_tensors(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    before = qwen_base.model.get_input_embeddings().weight.data_ptr()
    lens.to(torch.device("meta"))
    assert all(t.device.type == "meta" for t in lens.tensors.values())
    assert qwen_base.device.type == "cpu"
    assert qwen_base.model.get_input_embeddings().weight.data_ptr() == before


def test_chat_messages_equal_their_rendered_text(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    messages = [
        {"role": "user", "content": "Where is the mill?"},
        {"role": "assistant", "content": "Past the river."},
    ]
    opts = AnalysisOptions(temperature=0, calculate_salience=False)
    chat = analyze(lens, messages=messages, options=opts)
    rendered = qwen_base.tokenizer.apply_chat_template(
        messages, tokenize=False, continue_final_message=True
    )
    plain = analyze(lens, text=rendered, options=opts)
    assert chat["rows"] == plain["rows"]
    last = analyze(
        lens,
        messages=messages,
        options=AnalysisOptions(temperature=0, last_n_messages=1, calculate_salience=False),
    )
    assert 0 < len(last["rows"]) < len(chat["rows"])
    assert last["rows"] == chat["rows"][-len(last["rows"]) :]


def test_leading_bos_string_is_not_doubled(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    bos = qwen_base.tokenizer.bos_token
    opts = AnalysisOptions(temperature=0, calculate_salience=False)
    with_bos = analyze(lens, text=bos + "Red birds sang.", options=opts)
    plain = analyze(lens, text="Red birds sang.", options=opts)
    assert [r["token_id"] for r in with_bos["rows"]] == [r["token_id"] for r in plain["rows"]]
    assert with_bos["rows"][0]["token_id"] == qwen_base.tokenizer.bos_token_id


def test_bad_inputs_are_reported_not_clamped(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    with pytest.raises(BadInput, match="at least 2"):
        analyze(lens, text="")
    for bad in (
        {"temperature": 2.5},
        {"best_of_k": 0},
        {"batch_size": 0},
        {"temperature": -1},
        {"positions": [-1]},
        {"wat": 1},
    ):
        with pytest.raises(BadInput):
            analyze(lens, text=TEXT, options=AnalysisOptions.from_dict(bad))
    with pytest.raises(BadInput, match="beyond"):
        analyze(lens, text=TEXT, options=AnalysisOptions(positions=(999,)))
    with pytest.raises(BadInput):
        analyze(lens, messages=[{"role": "robot", "content": "hi"}])


def test_progress_and_cancel_between_batches(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    seen: list[tuple[int, int]] = []
    result = analyze(
        lens,
        text=TEXT,
        options=AnalysisOptions(temperature=0, batch_size=4),
        on_progress=lambda done, total: seen.append((done, total)),
    )
    total = len(result["rows"])
    assert seen[-1] == (total, total) and len(seen) == -(-total // 4)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        analyze(
            lens, text=TEXT, options=AnalysisOptions(temperature=0, batch_size=4), should_stop=stop
        )


def test_concurrent_lenses_on_one_base_do_not_cross_patch(demo_dir: Path, qwen_base):
    ids = ["qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l0-single"]
    lenses = [load_lens(demo_dir / "lenses" / i, qwen_base) for i in ids]
    opts = AnalysisOptions(temperature=0, calculate_salience=False, batch_size=2)
    alone = [analyze(lens, text=TEXT, options=opts)["rows"] for lens in lenses]
    together: list = [None] * len(lenses)

    def work(i: int) -> None:
        together[i] = analyze(lenses[i], text=TEXT, options=opts)["rows"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(lenses))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert together == alone


def test_vanishing_temperature_is_the_greedy_limit(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    greedy = analyze(lens, text=TEXT, options=AnalysisOptions(temperature=0, seed=1))
    for tiny in (5e-324, 6.1e-249):
        tiny_run = analyze(lens, text=TEXT, options=AnalysisOptions(temperature=tiny, seed=1))
        assert [r["explanation_token_ids"] for r in tiny_run["rows"]] == [
            r["explanation_token_ids"] for r in greedy["rows"]
        ]


def test_unpaired_surrogates_are_bad_input(demo_dir, qwen_base):
    lens = load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    with pytest.raises(BadInput, match="unpaired surrogate at character 1"):
        analyze(lens, text="a\ud800b c d")
    with pytest.raises(BadInput, match=r"messages\[0\].content is not valid Unicode"):
        analyze(lens, messages=[{"role": "user", "content": "hi \udfff"}])
