"""Build the demo tree: tiny random bases, a donor and lens checkpoints in the trainer's format.

Feeds tests, `make run` and the benches; nothing on the serving path imports it. Over 500 lines
after formatting: the base builders and the checkpoint writer share one recipe table, and most of
the length is that table and the trainer's config layout.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEMO_TEXT_PATH = Path(__file__).parent / "data" / "demo_text.txt"
NOISE = 0.05  # projection / prompt noise around the identity and the embedding rows

_QWEN2_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma's real template starts with the BOS string, so chat input exercises the double-BOS rule.
_GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class _TokenizerSpec:
    """A byte-level BPE tokenizer in the style of one model family."""

    bpe_specials: tuple[str, ...]  # ids 0.. in this order, before the learned vocabulary
    extra_specials: tuple[str, ...]  # appended after the learned vocabulary
    vocab_size: int  # learned vocabulary incl. bpe_specials, without extra_specials
    bos: str
    eos: str
    pad: str
    unk: str | None
    chat_template: str


_TOKENIZERS = {
    "qwen2": _TokenizerSpec(
        ("<|endoftext|>",),
        ("<|pad|>",),
        500,
        "<|endoftext|>",
        "<|endoftext|>",
        "<|pad|>",
        None,
        _QWEN2_CHAT_TEMPLATE,
    ),
    "gemma2": _TokenizerSpec(
        ("<pad>", "<eos>", "<bos>", "<unk>"),
        (),
        520,
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        _GEMMA2_CHAT_TEMPLATE,
    ),
}


@dataclass(frozen=True)
class _BaseRecipe:
    base_id: str
    family: str  # "qwen2" | "gemma2"
    seed: int
    kind: str = "bases"  # "bases" | "donors": the top-level folder


_BASES = (
    _BaseRecipe("qwen2-tiny", "qwen2", 1001),
    _BaseRecipe("gemma2-tiny", "gemma2", 1002),
    _BaseRecipe("qwen2-tiny-donor", "qwen2", 1003, kind="donors"),
)

_QWEN2_PROMPT = (
    "<|endoftext|>Short explanation of <embed>. Language, topic, sentiment, claims, speaker, "
    "style, etc:"
)
_GEMMA2_PROMPT = "<bos>Short explanation of <embed>. Language, topic, sentiment, claims, speaker:"
_SOFT_PLAIN = "Summary of the text:<text>"
_SOFT_POSTFIX = (
    "The following explanation describes the hidden state of the model:<text> That is all."
)


@dataclass(frozen=True)
class _LensRecipe:
    lens_id: str
    base_id: str
    layer: int
    t_text: int
    seed: int
    decoder_prompt: str
    patch_all_layers: bool | int | str
    per_layer_projections: bool = True
    new_decoder: bool = False
    soft_prompt_init_text: str = _SOFT_PLAIN
    add_current_token: bool = True
    special_last_token_vector: bool = True
    output_layer: int | None = None  # None: same as layer
    donor_id: str | None = None
    steps: tuple[tuple[int, int], ...] = ((8, 1),)  # (step, epoch) per file
    compiled: bool = False  # `_orig_mod.` key prefix, as torch.compile leaves it
    higher_step_older: bool = False  # the highest step gets the oldest mtime


# The lens ids and their shapes are fixed by the contract: groups and tests name them.
_LENSES = (
    _LensRecipe(
        lens_id="qwen2-tiny-l1",
        base_id="qwen2-tiny",
        layer=1,
        t_text=4,
        seed=11,
        decoder_prompt=_QWEN2_PROMPT,
        patch_all_layers=True,
        steps=((5, 1), (10, 2)),
    ),
    _LensRecipe(
        lens_id="qwen2-tiny-l2-first2",
        base_id="qwen2-tiny",
        layer=2,
        t_text=5,
        seed=12,
        decoder_prompt=_QWEN2_PROMPT,
        patch_all_layers=2,
        compiled=True,
    ),
    _LensRecipe(
        lens_id="qwen2-tiny-l0-single",
        base_id="qwen2-tiny",
        layer=0,
        t_text=4,
        seed=13,
        decoder_prompt="<|endoftext|>Explain <embed> in a few words:",
        patch_all_layers=True,
        per_layer_projections=False,
        soft_prompt_init_text=_SOFT_POSTFIX,
        add_current_token=False,
        special_last_token_vector=False,
        steps=((5, 1), (10, 1)),
    ),
    _LensRecipe(
        lens_id="qwen2-tiny-l1-donor",
        base_id="qwen2-tiny",
        layer=1,
        t_text=4,
        seed=14,
        decoder_prompt=_QWEN2_PROMPT,
        patch_all_layers=True,
        special_last_token_vector=False,
        donor_id="qwen2-tiny-donor",
    ),
    _LensRecipe(
        lens_id="gemma2-tiny-l1",
        base_id="gemma2-tiny",
        layer=1,
        t_text=5,
        seed=21,
        decoder_prompt=_GEMMA2_PROMPT,
        patch_all_layers=True,
        soft_prompt_init_text=_SOFT_POSTFIX,
        steps=((5, 1), (10, 2)),
        higher_step_older=True,
    ),
    _LensRecipe(
        lens_id="gemma2-tiny-l2-input",
        base_id="gemma2-tiny",
        layer=2,
        t_text=4,
        seed=22,
        decoder_prompt=_GEMMA2_PROMPT,
        patch_all_layers="just_input",
        new_decoder=True,
        output_layer=-1,
    ),
    _LensRecipe(
        lens_id="gemma2-tiny-l0-first1",
        base_id="gemma2-tiny",
        layer=0,
        t_text=5,
        seed=23,
        decoder_prompt="<bos>The hidden state <embed> means:",
        patch_all_layers=1,
        new_decoder=True,
        special_last_token_vector=False,
    ),
)


def make_demo(out_dir: Path, *, hidden_size: int = 64, n_layers: int = 3) -> dict:
    """Write the demo tree (bases, donor, lens run dirs, manifest.json) under `out_dir`.

    Model weights are byte-identical across runs: every random draw comes from a fixed seed, and
    the global torch RNG is restored afterwards. Bigger sizes serve the memory bench.

    Args:
        out_dir: created if missing; the demo's own subfolders are rewritten.
        hidden_size: d of every base (64 for the demo).
        n_layers: decoder blocks of every base (3 for the demo; at least 3).

    Returns:
        The manifest dict, also written to `out_dir/manifest.json` (paths relative to it).

    Raises:
        ValueError: `n_layers` below 3.

    """
    from transformers import AutoTokenizer

    if n_layers < 3:
        raise ValueError(f"n_layers must be >= 3 (the demo has a layer-2 lens), got {n_layers}")
    out_dir = Path(out_dir)
    manifest: dict[str, Any] = {"bases": {}, "donors": {}, "lenses": {}}
    tokenizers = {family: train_tokenizer(family) for family in _TOKENIZERS}
    embeddings: dict[str, torch.Tensor] = {}
    hf_tokenizers = {}
    for recipe in _BASES:
        rel = f"{recipe.kind}/{recipe.base_id}"
        model = write_base(
            out_dir / rel,
            recipe.family,
            tokenizers[recipe.family],
            seed=recipe.seed,
            hidden_size=hidden_size,
            n_layers=n_layers,
        )
        manifest[recipe.kind][recipe.base_id] = rel
        if recipe.kind == "bases":
            embeddings[recipe.base_id] = model.get_input_embeddings().weight.detach().clone()
            hf_tokenizers[recipe.base_id] = AutoTokenizer.from_pretrained(out_dir / rel)
    for lens in _LENSES:
        rel = f"lenses/{lens.lens_id}"
        _write_lens_run(
            out_dir / rel, lens, hf_tokenizers[lens.base_id], embeddings[lens.base_id], n_layers
        )
        manifest["lenses"][lens.lens_id] = {
            "base": lens.base_id,
            "donor": lens.donor_id,
            "layer": lens.layer,
            "t_text": lens.t_text,
            "checkpoint": rel,
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def train_tokenizer(family: str, text: str | None = None):
    """Train a byte-level BPE tokenizer in `family`'s style on the bundled demo text.

    Returns a `tokenizers.Tokenizer` whose post-processor prepends BOS to plain text, as the
    real Qwen2-style and Gemma2-style tokenizers of the parity sample do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = _TOKENIZERS[family]
    text = DEMO_TEXT_PATH.read_text() if text is None else text
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.bpe_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    if spec.extra_specials:
        tok.add_special_tokens(list(spec.extra_specials))
    bos_id = tok.token_to_id(spec.bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{spec.bos} $A", pair=f"{spec.bos} $A $B:1", special_tokens=[(spec.bos, bos_id)]
    )
    return tok


def _write_tokenizer(out: Path, family: str, tok) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json, like the sample."""
    spec = _TOKENIZERS[family]
    tok.save(str(out / "tokenizer.json"))
    specials = spec.bpe_specials + spec.extra_specials
    added = {
        str(tok.token_to_id(s)): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s in specials
    }
    named = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad}
    if spec.unk is not None:
        named["unk_token"] = spec.unk
    config = {
        "added_tokens_decoder": added,
        **named,
        "chat_template": spec.chat_template,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {},
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(named, indent=2) + "\n")


def _model_config(family: str, tok, hidden_size: int, n_layers: int):
    """Return a transformers config for a tiny `family` model (values as in the parity sample)."""
    spec = _TOKENIZERS[family]
    n_heads = max(4, hidden_size // 64)
    common = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads // 2,
        max_position_embeddings=512,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        bos_token_id=tok.token_to_id(spec.bos),
        eos_token_id=tok.token_to_id(spec.eos),
        pad_token_id=tok.token_to_id(spec.pad),
        tie_word_embeddings=True,
    )
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common, use_sliding_window=False)
    from transformers import Gemma2Config

    head_dim = hidden_size // n_heads
    return Gemma2Config(
        **common,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=16,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
        attn_implementation="eager",
    )


def write_base(
    out: Path, family: str, tok, *, seed: int, hidden_size: int = 64, n_layers: int = 3
) -> torch.nn.Module:
    """Write one random float32 base model (safetensors) plus its tokenizer to `out`.

    Returns the model, so callers can read its embedding rows.
    """
    from transformers import AutoModelForCausalLM

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = _model_config(family, tok, hidden_size, n_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(out)
    if family == "gemma2":
        # NOTE: transformers 5 does not save attn_implementation; sdpa ignores soft-capping
        # (LENS_FORMAT §Decoding), so pin eager for every loader of this directory.
        cfg = json.loads((out / "config.json").read_text())
        cfg["attn_implementation"] = "eager"
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    _write_tokenizer(out, family, tok)
    return model


def projection_count(patch_all_layers: bool | int | str, new_decoder: bool, n_layers: int) -> int:
    """Return P, the rows of `proj_weight`, as LENS_FORMAT §Compatibility implies."""
    if patch_all_layers is True:
        return n_layers
    n = 0 if patch_all_layers in ("just_input", False) else int(patch_all_layers)
    return n + 1 if new_decoder else n


def _lens_config(lens: _LensRecipe, n_layers: int) -> dict:
    """Return the full nested trainer config for `lens`, unknown extra keys included."""
    base_rel = f"bases/{lens.base_id}"
    config = {
        "run_name": f"demo_{lens.lens_id}",
        "model_name": base_rel,
        "tokenizer_name": base_rel,
        "layer_l": lens.layer,
        "t_text": lens.t_text,
        "model_dtype": "float32",
        "decoder_prompt": lens.decoder_prompt,
        "encoder_prompt": lens.soft_prompt_init_text,
        "gumbel_tau_schedule": {"type": "constant", "value": 0.5, "end_value": 0.5},
        "trainable_components": {
            "decoder": {
                "base_model": False,
                "detach_after_each_sample": False,
                "embedding_head": False,
                "end_to_end": True,
                "eye_init": True,
                "output_head": False,
                "new_decoder": lens.new_decoder,
                "patch_all_layers": lens.patch_all_layers,
                "per_layer_projections": lens.per_layer_projections,
                "projection_layer": True,
                "trainable_prompts": True,
                "use_dropout": False,
                "use_kv_cache": True,
            },
            "encoder": {
                "add_current_token": lens.add_current_token,
                "base_model": False,
                "embedding_head": False,
                "eye_init": True,
                "output_layer": lens.layer if lens.output_layer is None else lens.output_layer,
                "pos_embeddings": False,
                "projection_layer": True,
                "soft_prompt_init_text": lens.soft_prompt_init_text,
                "special_last_token_vector": lens.special_last_token_vector,
                "trainable_soft_prompt": True,
                "use_base_model": True,
                "use_dropout": False,
                "use_projection_layer": True,
            },
        },
        "verbose_samples": {"tuned_lens_checkpoint_path_or_name": None},
        # Keys lens-serve does not know: loaders must ignore them (LENS_FORMAT §Config).
        "learning_rate": 1e-4,
        "lens_serve_demo": {"seed": lens.seed, "n_layers": n_layers, "note": "random demo lens"},
    }
    if lens.base_id.startswith("gemma2"):
        config["attn_implementation"] = "eager"
    if lens.donor_id is not None:
        config["different_activations_model"] = f"donors/{lens.donor_id}"
    return config


def _prompt_rows(tokenizer, emb: torch.Tensor, text: str, gen: torch.Generator):
    """Tokenize `text` without specials; return (ids [n] int64, embedding rows + noise [n, d])."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    rows = emb[ids] + NOISE * torch.randn(len(ids), emb.shape[1], generator=gen)
    return ids, rows


def _near_identity(shape: tuple[int, ...], d: int, gen: torch.Generator) -> torch.Tensor:
    """Return eye(d) (broadcast to `shape`) plus noise, so projections start meaningful."""
    return torch.eye(d).expand(shape).clone() + NOISE * torch.randn(shape, generator=gen)


def _lens_tensors(
    lens: _LensRecipe, tokenizer, emb: torch.Tensor, n_layers: int, step: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return (decoder, encoder) state dicts for `lens` at `step`; each step draws new noise."""
    d = emb.shape[1]
    gen = torch.Generator().manual_seed(lens.seed * 1000 + step)
    left, right = lens.decoder_prompt.split("<embed>")
    left_ids, left_emb = _prompt_rows(tokenizer, emb, left, gen)  # [Lp], [Lp, d]
    right_ids, right_emb = _prompt_rows(tokenizer, emb, right, gen)  # [Rp], [Rp, d]
    decoder: dict[str, torch.Tensor] = {}
    if lens.per_layer_projections:
        p = projection_count(lens.patch_all_layers, lens.new_decoder, n_layers)
        decoder["proj_weight"] = _near_identity((p, d, d), d, gen)  # [P, d, d]
        decoder["proj_bias"] = NOISE * torch.randn(p, d, generator=gen)  # [P, d]
    else:
        decoder["proj.weight"] = _near_identity((d, d), d, gen)
        decoder["proj.bias"] = NOISE * torch.randn(d, generator=gen)
    decoder["prompt_left_emb"] = left_emb
    decoder["prompt_right_emb"] = right_emb
    decoder["prompt_ids"] = torch.cat([left_ids, torch.zeros(1, dtype=torch.int64), right_ids])

    soft, postfix = lens.soft_prompt_init_text.split("<text>")
    encoder = {"proj.weight": _near_identity((d, d), d, gen)}
    encoder["proj.bias"] = NOISE * torch.randn(d, generator=gen)
    encoder["soft_prompt_embeddings"] = _prompt_rows(tokenizer, emb, soft, gen)[1]  # [S, d]
    if postfix:
        encoder["soft_prompt_embeddings_postfix"] = _prompt_rows(tokenizer, emb, postfix, gen)[1]
    if lens.special_last_token_vector:
        encoder["special_last_token_vector"] = NOISE * torch.randn(d, generator=gen)  # [d]
    return decoder, encoder


def _optimizer_state(params: list[torch.Tensor], step: int, gen: torch.Generator) -> dict:
    """Return an Adam-like state dict (two moments per float tensor), as the trainer saves."""
    floats = [p for p in params if p.is_floating_point()]
    state = {
        i: {
            "step": torch.tensor(float(step)),
            "exp_avg": 1e-3 * torch.randn(p.shape, generator=gen),
            "exp_avg_sq": 1e-6 * torch.rand(p.shape, generator=gen),
        }
        for i, p in enumerate(floats)
    }
    group = {
        "params": list(range(len(floats))),
        "lr": 1e-4,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
    }
    return {"state": state, "param_groups": [group]}


def _write_lens_run(
    run_dir: Path, lens: _LensRecipe, tokenizer, emb: torch.Tensor, n_layers: int
) -> None:
    """Write every checkpoint file of one lens run dir in the trainer's format."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    config = _lens_config(lens, n_layers)
    prefix = "_orig_mod." if lens.compiled else ""
    paths = []
    for step, epoch in lens.steps:
        decoder, encoder = _lens_tensors(lens, tokenizer, emb, n_layers, step)
        gen = torch.Generator().manual_seed(lens.seed * 1000 + step + 500)
        ckpt = {
            "step": step,
            "epoch": epoch,
            "models": {
                "decoder": {prefix + k: v for k, v in decoder.items()},
                "encoder": {prefix + k: v for k, v in encoder.items()},
            },
            "config": config,
            "optim": _optimizer_state([*decoder.values(), *encoder.values()], step, gen),
            "rng_states": {
                "torch": gen.get_state(),
                "cuda": [],
                "numpy": np.random.RandomState(lens.seed).get_state(),
            },
            "tau": 0.5,
            "alpha": 1.0,
            "metrics": {},
            "wandb_run_id": None,
        }
        path = run_dir / f"checkpoint_step{step}_epoch{epoch}_.pt"
        torch.save(ckpt, path)
        paths.append(path)
    if lens.higher_step_older and len(paths) > 1:
        # The trainer's analyzer picked by mtime; lens-serve must pick by step (LENS_FORMAT).
        oldest = min(p.stat().st_mtime for p in paths) - 3600
        os.utime(paths[-1], (oldest, oldest))
