"""Issue 11: rows of several requests and lenses share one pass and compute what they do alone.

Works of one shape key (same base, decoder prompt lengths, encoder input lengths) run as one
pass (`lenscore.batch.run_works`); every row must equal its unbatched run, at temperature 0
and sampled, whatever else shares the pass. Whole analyses driven together (`run_together`)
must give the ids `analyze` gives (floats to rounding: a CPU GEMM of fewer than ~12 rows
takes another kernel, so a 1-row tail chunk alone rounds differently), and on the parity
sample the trainer's outputs.
"""

import json
from pathlib import Path

import pytest
import torch

from lenscore import AnalysisOptions, analyze, load_base, load_lens
from lenscore.analyze import analysis_steps
from lenscore.batch import (
    DecodeWork,
    EncodeWork,
    run_alone,
    run_together,
    run_works,
    shape_key,
)
from lenscore.sampling import SampleKeys
from tests.lenscore.test_parity import CASES, compare_rows

TEXT = "The farmers planted wheat in the valley, and the river ran past the old mill."
OTHER = "A small boat drifted slowly down the river towards the sea at dawn."
GROUPS = {
    "qwen2-tiny": ["qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l1-donor",
                   "qwen2-tiny-l0-single"],
    "gemma2-tiny": ["gemma2-tiny-l1", "gemma2-tiny-l2-input", "gemma2-tiny-l0-first1"],
}  # fmt: skip


@pytest.fixture(scope="module")
def lenses(demo_dir, qwen_base, gemma_base, qwen_donor):
    bases = {"qwen2-tiny": qwen_base, "gemma2-tiny": gemma_base}
    out = {}
    for group, ids in GROUPS.items():
        for lens_id in ids:
            donor = qwen_donor if lens_id.endswith("donor") else None
            path = demo_dir / "lenses" / lens_id
            out[lens_id] = load_lens(path, bases[group], donor=donor, lens_id=lens_id)
    return out


def activations(lens, text=TEXT):
    ids = torch.tensor([lens.base.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return ids, lens.activation_model.capture(ids, lens.config.layer_l)[0]


def by_key(works):
    groups: dict[tuple, list] = {}
    for work in works:
        groups.setdefault(shape_key(work), []).append(work)
    return groups


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_mixed_lens_passes_equal_each_work_alone(lenses, group):
    decodes = []
    for i, lens_id in enumerate(GROUPS[group]):
        lens = lenses[lens_id]
        _, acts = activations(lens)
        decodes.append(DecodeWork(lens, acts[:7], 0.0, None, 1))
        keys = SampleKeys.grid(40 + i, range(3, 8), [1, 3, 2, 1, 4])
        repeats = torch.tensor([1, 3, 2, 1, 4])
        decodes.append(DecodeWork(lens, acts[3:8], 0.9, keys, repeats))
    groups = by_key(decodes)
    # Lenses with equal prompt lengths share a decode pass; different lengths cannot.
    assert any(len({id(w.lens) for w in ws}) > 1 for ws in groups.values())
    encodes = []
    for works in groups.values():
        for work, mixed in zip(works, run_works(works), strict=True):
            alone = work.run_alone()
            assert torch.equal(mixed, alone), (work.lens.lens_id, work.temperature)
            current = torch.arange(mixed.shape[0]) % 40 + 3
            encodes.append(EncodeWork(work.lens, mixed, current))
    for works in by_key(encodes).values():
        for work, mixed in zip(works, run_works(works), strict=True):
            assert torch.equal(mixed, work.run_alone()), work.lens.lens_id


def test_a_sampled_row_does_not_depend_on_what_shares_its_pass(lenses):
    lens, other = lenses["qwen2-tiny-l1"], lenses["qwen2-tiny-l2-first2"]
    _, acts = activations(lens)
    _, other_acts = activations(other, OTHER)
    keys = SampleKeys.grid(5, range(4), 3)
    mine = DecodeWork(lens, acts[:4], 1.0, keys, 3)
    alone = mine.run_alone()
    crowd = [
        DecodeWork(other, other_acts[:9], 0.0, None, 1),
        mine,
        DecodeWork(lens, acts[4:12], 0.7, SampleKeys.grid(9, range(4, 12), 2), 2),
    ]
    assert torch.equal(run_works(crowd)[1], alone)
    pieces = [mine.take(0, 1), mine.take(1, 4)]
    assert torch.equal(torch.cat(run_works(pieces)), alone)
    middle = mine.take(1, 3)
    assert middle.rows == 6 and middle.keys.position.tolist() == [1, 1, 1, 2, 2, 2]


def test_works_of_different_shape_keys_do_not_share_a_pass(lenses):
    a, b = lenses["qwen2-tiny-l1"], lenses["qwen2-tiny-l0-single"]
    _, acts = activations(a)
    works = [DecodeWork(a, acts[:2], 0.0, None), DecodeWork(b, acts[:2], 0.0, None)]
    assert shape_key(works[0]) != shape_key(works[1])
    with pytest.raises(ValueError, match="shape keys"):
        run_works(works)


def options(**extra):
    return AnalysisOptions(seed=17, batch_size=5, logit_lens=True, **extra)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_analyses_of_every_lens_driven_together_equal_analyze(lenses, group):
    requests = []
    for i, lens_id in enumerate(GROUPS[group]):
        lens = lenses[lens_id]
        requests.append((lens, TEXT, options(temperature=0.0)))
        requests.append((lens, OTHER, options(temperature=0.8, best_of_k=1 + i % 3)))
    together = run_together(
        [analysis_steps(lens, text=text, options=opts) for lens, text, opts in requests]
    )
    for (lens, text, opts), result in zip(requests, together, strict=True):
        alone = analyze(lens, text=text, options=opts)
        assert result["meta"]["options"] == alone["meta"]["options"]
        assert_same_rows(result["rows"], alone["rows"], f"{lens.lens_id} T={opts.temperature}")


def assert_same_rows(mine: list[dict], ref: list[dict], what: str) -> None:
    """Equal ids and strings; floats equal to float32 rounding."""
    assert len(mine) == len(ref), what
    floats = ("mse", "relative_rmse", "token_salience", "logit_lens_top")
    for a, b in zip(mine, ref, strict=True):
        where = f"{what} position {b['position']}"
        assert {k: v for k, v in a.items() if k not in floats} == {
            k: v for k, v in b.items() if k not in floats
        }, where
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-5), where
        assert a["relative_rmse"] == pytest.approx(b["relative_rmse"], rel=1e-5), where
        assert a["token_salience"] == pytest.approx(b["token_salience"], rel=1e-4, abs=1e-5)
        assert [e["token_id"] for e in a["logit_lens_top"]] == [
            e["token_id"] for e in b["logit_lens_top"]
        ], where


def test_run_alone_turns_a_device_oom_into_the_analysis_error(lenses):
    from lenscore import OutOfDeviceMemory

    lens = lenses["qwen2-tiny-l1"]
    steps = analysis_steps(lens, text=TEXT, options=options(temperature=0.0))
    work = next(steps)
    with pytest.raises(OutOfDeviceMemory, match="smaller batch_size"):
        steps.throw(torch.OutOfMemoryError("injected"))
    assert isinstance(work, DecodeWork)
    assert run_alone(analysis_steps(lens, text=TEXT, options=options(temperature=0.0)))


@pytest.fixture(scope="module")
def parity_lenses(parity_dir: Path) -> dict:
    out = {}
    for key, ckpt, base in CASES:
        out[key] = load_lens(parity_dir / ckpt, load_base(parity_dir / "models" / base))
    return out


@pytest.mark.parametrize("key", ["a", "d"])
def test_parity_texts_batched_together_match_the_trainer_outputs(parity_dir, parity_lenses, key):
    expected = [
        json.loads((parity_dir / "expected" / f"{key}__{i}.json").read_text()) for i in range(4)
    ]
    opts = AnalysisOptions(temperature=0, logit_lens=True, batch_size=16)
    lens = parity_lenses[key]
    together = run_together([analysis_steps(lens, text=e["text"], options=opts) for e in expected])
    for result, want in zip(together, expected, strict=True):
        compare_rows(result["rows"], want)
