from pathlib import Path

import pytest
import torch

from lenscore import IncompatibleLens, check_compat, load_lens, read_checkpoint


def problems_of(path: Path, base) -> list[str]:
    return check_compat(read_checkpoint(path), base.info)


def test_demo_lenses_are_compatible_with_their_bases(
    demo_dir, demo_manifest, qwen_base, gemma_base
):
    bases = {"qwen2-tiny": qwen_base, "gemma2-tiny": gemma_base}
    for lens_id, entry in demo_manifest["lenses"].items():
        raw = read_checkpoint(demo_dir / entry["checkpoint"])
        assert check_compat(raw, bases[entry["base"]].info) == [], lens_id


def test_layer_out_of_range(rewrite, qwen_base):
    path = rewrite("qwen2-tiny-l1", lambda b: b["config"].__setitem__("layer_l", 3))
    assert "layer_l 3 is out of range for a base with 3 layers" in problems_of(path, qwen_base)


def test_encoder_output_layer_out_of_range(rewrite, qwen_base):
    def edit(blob):
        blob["config"]["trainable_components"]["encoder"]["output_layer"] = 7

    problems = problems_of(rewrite("qwen2-tiny-l1", edit), qwen_base)
    assert any("encoder output_layer 7 is out of range" in p for p in problems)


def test_hidden_size_mismatch_names_the_tensor(rewrite, qwen_base):
    def edit(blob):
        blob["models"]["encoder"]["special_last_token_vector"] = torch.zeros(32)

    problems = problems_of(rewrite("qwen2-tiny-l1", edit), qwen_base)
    assert "encoder tensor special_last_token_vector has hidden size 32, base has 64" in problems


def test_projection_count_must_match_the_config(rewrite, qwen_base):
    def edit(blob):
        blob["config"]["trainable_components"]["decoder"]["patch_all_layers"] = 2

    problems = problems_of(rewrite("qwen2-tiny-l1", edit), qwen_base)
    assert any(
        "decoder has 3 per-layer projections but the config implies 2" in p for p in problems
    )


@pytest.mark.parametrize(
    ("patch", "new_decoder", "message"),
    [
        (False, False, "implies no projection at all"),
        (0, False, "implies no projection at all"),
        (True, True, "new_decoder with patch_all_layers: true is unsupported"),
    ],
)
def test_configs_the_trainer_cannot_run_are_refused(
    rewrite, qwen_base, patch, new_decoder, message
):
    def edit(blob):
        dec = blob["config"]["trainable_components"]["decoder"]
        dec["patch_all_layers"] = patch
        dec["new_decoder"] = new_decoder

    problems = problems_of(rewrite("qwen2-tiny-l1", edit), qwen_base)
    assert any(message in p for p in problems), problems


def test_prompt_width_mismatch(rewrite, qwen_base):
    def edit(blob):
        dec = blob["models"]["decoder"]
        dec["prompt_left_emb"] = dec["prompt_left_emb"][1:]

    problems = problems_of(rewrite("qwen2-tiny-l1", edit), qwen_base)
    assert any(p.startswith("prompt_ids has") for p in problems)
    assert any(p.startswith("decoder prompt tokenizes to") for p in problems)


def test_prompt_ids_outside_the_tokenizer_vocabulary(rewrite, qwen_base):
    def edit(blob):
        blob["models"]["decoder"]["prompt_ids"][0] = 100_000

    problems = problems_of(rewrite("qwen2-tiny-l1", edit), qwen_base)
    assert any("prompt_ids use token id 100000, beyond the base tokenizer" in p for p in problems)


def test_soft_prompt_width_mismatch(rewrite, gemma_base):
    def edit(blob):
        enc = blob["models"]["encoder"]
        enc["soft_prompt_embeddings_postfix"] = enc["soft_prompt_embeddings_postfix"][:2]

    problems = problems_of(rewrite("gemma2-tiny-l1", edit), gemma_base)
    assert any(p.startswith("encoder soft prompt tokenizes to") for p in problems)


def test_base_tensors_that_differ_refuse_the_lens(rewrite, qwen_base):
    def edit(blob):
        w = qwen_base.model.state_dict()["model.norm.weight"]
        blob["models"]["decoder"]["base.model.norm.weight"] = w + 1
        blob["models"]["encoder"]["base.model.norm.weight"] = w.clone()  # equal: fine

    with pytest.raises(IncompatibleLens) as err:
        load_lens(rewrite("qwen2-tiny-l1", edit), qwen_base)
    assert err.value.problems == [
        "decoder carries base weight model.norm.weight that differs from the shared base: "
        "this lens needs its own base"
    ]


def test_lens_on_another_family_base_is_refused(demo_dir, gemma_base):
    with pytest.raises(IncompatibleLens) as err:
        load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", gemma_base, lens_id="q")
    assert str(err.value).startswith("lens q (")
    assert any(p.startswith("decoder prompt tokenizes to") for p in err.value.problems)


def test_unreadable_patch_setting_is_a_problem_not_a_crash(rewrite, qwen_base):
    def edit(blob):
        blob["config"]["trainable_components"]["decoder"]["patch_all_layers"] = "all"

    problems = problems_of(rewrite("qwen2-tiny-l1", edit), qwen_base)
    assert problems == [
        "config cannot be read: decoder.patch_all_layers must be true, false, an integer or "
        "'just_input', not 'all'"
    ]
