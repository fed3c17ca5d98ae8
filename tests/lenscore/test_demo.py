import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lenscore.demo import make_demo, projection_count

LENS_IDS = {
    "qwen2-tiny-l1": "qwen2-tiny",
    "qwen2-tiny-l2-first2": "qwen2-tiny",
    "qwen2-tiny-l0-single": "qwen2-tiny",
    "qwen2-tiny-l1-donor": "qwen2-tiny",
    "gemma2-tiny-l1": "gemma2-tiny",
    "gemma2-tiny-l2-input": "gemma2-tiny",
    "gemma2-tiny-l0-first1": "gemma2-tiny",
}
# LENS_FORMAT §The checkpoint file: the only globals a trainer checkpoint may need.
ALLOWED_GLOBALS = [
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
    np._core.multiarray._reconstruct,
]
BASE_DIRS = ["bases/qwen2-tiny", "bases/gemma2-tiny", "donors/qwen2-tiny-donor"]


def load_safe(path: Path) -> dict:
    with torch.serialization.safe_globals(ALLOWED_GLOBALS):
        return torch.load(path, weights_only=True)


def strip(sd: dict) -> dict:
    return {k.removeprefix("_orig_mod."): v for k, v in sd.items()}


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run dir, lowest step first."""
    return sorted(run_dir.glob("checkpoint_step*_epoch*_*.pt"), key=lambda p: step_of(p))


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1].removeprefix("step"))


def newest(demo_dir: Path, lens_id: str) -> dict:
    return load_safe(checkpoint_files(demo_dir / "lenses" / lens_id)[-1])


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_manifest_names_every_contract_id_with_existing_paths(demo_dir, demo_manifest):
    assert demo_manifest["bases"] == {
        "qwen2-tiny": "bases/qwen2-tiny",
        "gemma2-tiny": "bases/gemma2-tiny",
    }
    assert demo_manifest["donors"] == {"qwen2-tiny-donor": "donors/qwen2-tiny-donor"}
    assert set(demo_manifest["lenses"]) == set(LENS_IDS)
    for lens_id, entry in demo_manifest["lenses"].items():
        assert set(entry) == {"base", "donor", "layer", "t_text", "checkpoint"}
        assert entry["base"] == LENS_IDS[lens_id]
        assert entry["donor"] == ("qwen2-tiny-donor" if lens_id.endswith("-donor") else None)
        assert entry["checkpoint"] == f"lenses/{lens_id}"
        assert checkpoint_files(demo_dir / entry["checkpoint"])
        config = newest(demo_dir, lens_id)["config"]
        assert (entry["layer"], entry["t_text"]) == (config["layer_l"], config["t_text"])
    assert json.loads((demo_dir / "manifest.json").read_text()) == demo_manifest


@pytest.mark.parametrize("rel", BASE_DIRS)
def test_bases_load_with_plain_transformers(demo_dir, rel):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / rel)
    model = AutoModelForCausalLM.from_pretrained(demo_dir / rel)
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 3
    assert model.config.hidden_size == 64
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("The farmer found an old map.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_gemma2_base_uses_eager_attention_with_soft_capping(demo_dir):
    config = AutoConfig.from_pretrained(demo_dir / "bases/gemma2-tiny")
    assert config.model_type == "gemma2"
    assert config.sliding_window == 16
    assert config.attn_logit_softcapping == 50.0
    assert config.final_logit_softcapping == 30.0
    assert config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "rel, bos, bos_id",
    [("bases/qwen2-tiny", "<|endoftext|>", 0), ("bases/gemma2-tiny", "<bos>", 2)],
)
def test_tokenizer_prepends_bos_and_has_a_null_token(demo_dir, rel, bos, bos_id):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / rel)
    assert tokenizer.bos_token == bos
    assert tokenizer.bos_token_id == bos_id
    ids = tokenizer("hi there", add_special_tokens=True)["input_ids"]
    assert ids[0] == bos_id
    assert bos_id not in tokenizer("hi there", add_special_tokens=False)["input_ids"]
    assert tokenizer.encode(" ", add_special_tokens=False)
    # A text starting with the BOS string gives two BOS ids: LENS_FORMAT's double-BOS rule.
    assert tokenizer(bos + "hi")["input_ids"][:2] == [bos_id, bos_id]


def test_special_token_ids_follow_the_family_layout(demo_dir):
    qwen = AutoTokenizer.from_pretrained(demo_dir / "bases/qwen2-tiny")
    assert qwen.eos_token_id == 0
    assert qwen.pad_token_id == len(qwen) - 1
    gemma = AutoTokenizer.from_pretrained(demo_dir / "bases/gemma2-tiny")
    assert [gemma.pad_token_id, gemma.eos_token_id, gemma.bos_token_id] == [0, 1, 2]
    assert gemma.unk_token_id == 3


@pytest.mark.parametrize("rel", ["bases/qwen2-tiny", "bases/gemma2-tiny"])
def test_chat_template_renders_system_user_and_assistant(demo_dir, rel):
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / rel)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is the map?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in prompt and "Where is the map?" in prompt
    messages.append({"role": "assistant", "content": "On the table"})
    cont = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert cont.endswith("On the table")


def test_donor_shares_config_and_tokenizer_but_not_weights(demo_dir):
    base, donor = demo_dir / "bases/qwen2-tiny", demo_dir / "donors/qwen2-tiny-donor"
    assert (base / "tokenizer.json").read_bytes() == (donor / "tokenizer.json").read_bytes()
    assert json.loads((base / "config.json").read_text()) == json.loads(
        (donor / "config.json").read_text()
    )
    assert (base / "model.safetensors").read_bytes() != (donor / "model.safetensors").read_bytes()


@pytest.mark.parametrize("lens_id", sorted(LENS_IDS))
def test_checkpoints_load_with_the_weights_only_allow_list(demo_dir, lens_id):
    for path in checkpoint_files(demo_dir / "lenses" / lens_id):
        ckpt = load_safe(path)
        assert {"models", "config", "step", "epoch", "rng_states", "optim"} <= set(ckpt)
        assert path.name == f"checkpoint_step{ckpt['step']}_epoch{ckpt['epoch']}_.pt"
        assert isinstance(ckpt["rng_states"]["numpy"][1], np.ndarray)
        assert ckpt["rng_states"]["numpy"][1].dtype == np.uint32
        for part in ("decoder", "encoder"):
            for tensor in ckpt["models"][part].values():
                assert tensor.dtype in (torch.float32, torch.int64)


@pytest.mark.parametrize("lens_id", sorted(LENS_IDS))
def test_projection_rows_match_the_config(demo_dir, lens_id):
    ckpt = newest(demo_dir, lens_id)
    decoder = strip(ckpt["models"]["decoder"])
    cfg = ckpt["config"]["trainable_components"]["decoder"]
    assert cfg["base_model"] is False and cfg["output_head"] is False
    if cfg["per_layer_projections"]:
        p = projection_count(cfg["patch_all_layers"], cfg["new_decoder"], 3)
        assert decoder["proj_weight"].shape == (p, 64, 64)
        assert decoder["proj_bias"].shape == (p, 64)
    else:
        assert decoder["proj.weight"].shape == (64, 64)
        assert "proj_weight" not in decoder


def test_projection_counts_follow_lens_format_rules():
    assert projection_count(True, False, 3) == 3
    assert projection_count(2, False, 3) == 2
    assert projection_count(2, True, 3) == 3
    assert projection_count(1, True, 3) == 2
    assert projection_count("just_input", True, 3) == 1


@pytest.mark.parametrize("lens_id", sorted(LENS_IDS))
def test_prompt_lengths_match_the_prompt_texts(demo_dir, lens_id):
    ckpt = newest(demo_dir, lens_id)
    config = ckpt["config"]
    tokenizer = AutoTokenizer.from_pretrained(demo_dir / "bases" / LENS_IDS[lens_id])
    decoder, encoder = (strip(ckpt["models"][k]) for k in ("decoder", "encoder"))
    left, right = config["decoder_prompt"].split("<embed>")
    lp, rp = token_count(tokenizer, left), token_count(tokenizer, right)
    assert decoder["prompt_left_emb"].shape == (lp, 64)
    assert decoder["prompt_right_emb"].shape == (rp, 64)
    assert decoder["prompt_ids"].dtype == torch.int64
    ids = decoder["prompt_ids"].tolist()
    assert len(ids) == lp + 1 + rp
    assert ids[:lp] == tokenizer(left, add_special_tokens=False)["input_ids"]
    assert ids[lp + 1 :] == tokenizer(right, add_special_tokens=False)["input_ids"]
    enc_cfg = config["trainable_components"]["encoder"]
    soft, postfix = enc_cfg["soft_prompt_init_text"].split("<text>")
    assert encoder["soft_prompt_embeddings"].shape == (token_count(tokenizer, soft), 64)
    if postfix:
        assert encoder["soft_prompt_embeddings_postfix"].shape == (
            token_count(tokenizer, postfix),
            64,
        )
    else:
        assert "soft_prompt_embeddings_postfix" not in encoder
    assert ("special_last_token_vector" in encoder) == enc_cfg["special_last_token_vector"]


def test_configs_carry_every_lens_format_field(demo_dir):
    for lens_id in LENS_IDS:
        config = newest(demo_dir, lens_id)["config"]
        for key in ("model_name", "tokenizer_name", "layer_l", "t_text", "model_dtype"):
            assert key in config, (lens_id, key)
        assert config["model_dtype"] == "float32"
        assert config["decoder_prompt"].count("<embed>") == 1
        assert config["encoder_prompt"].count("<text>") == 1
        enc = config["trainable_components"]["encoder"]
        for key in ("output_layer", "add_current_token", "use_projection_layer", "pos_embeddings"):
            assert key in enc, (lens_id, key)
        assert enc["use_projection_layer"] is True and enc["pos_embeddings"] is False
    outputs = {
        newest(demo_dir, i)["config"]["trainable_components"]["encoder"]["output_layer"]
        for i in LENS_IDS
    }
    assert -1 in outputs


def test_higher_step_holds_different_tensors_and_older_mtime_is_possible(demo_dir):
    two_step = [i for i in LENS_IDS if len(checkpoint_files(demo_dir / "lenses" / i)) == 2]
    assert len(two_step) >= 2
    for lens_id in two_step:
        low, high = checkpoint_files(demo_dir / "lenses" / lens_id)
        a, b = load_safe(low), load_safe(high)
        assert a["step"] < b["step"]
        assert not torch.equal(
            strip(a["models"]["encoder"])["proj.weight"],
            strip(b["models"]["encoder"])["proj.weight"],
        )
    low, high = checkpoint_files(demo_dir / "lenses" / "gemma2-tiny-l1")
    assert high.stat().st_mtime < low.stat().st_mtime


def test_compiled_lens_keys_carry_the_orig_mod_prefix(demo_dir):
    ckpt = newest(demo_dir, "qwen2-tiny-l2-first2")
    for part in ("decoder", "encoder"):
        assert all(k.startswith("_orig_mod.") for k in ckpt["models"][part])


def test_make_demo_is_deterministic_and_leaves_the_global_rng_alone(demo_dir, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_demo(tmp_path)
    assert torch.equal(torch.rand(3), expected)
    weight_files = [*tmp_path.glob("*/*/model.safetensors"), *tmp_path.glob("lenses/*/*.pt")]
    assert len(weight_files) == 3 + 10
    for path in weight_files:
        rel = path.relative_to(tmp_path)
        assert path.read_bytes() == (demo_dir / rel).read_bytes(), rel
