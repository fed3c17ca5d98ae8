"""lenscore against the trainer's own outputs (../shared/parity-sample), position by position."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lenscore import AnalysisOptions, analyze, load_base, load_lens

CASES = [("a", "ckpt_a_qwen2_L1", "base_qwen2"), ("d", "ckpt_d_gemma2_L1", "base_gemma2")]


@pytest.fixture(scope="module")
def lenses(parity_dir: Path) -> dict:
    out = {}
    for key, ckpt, base in CASES:
        out[key] = load_lens(parity_dir / ckpt, load_base(parity_dir / "models" / base))
    return out


def compare_rows(got: list[dict], expected: dict) -> None:
    assert [r["token_id"] for r in got] == expected["input_ids"]
    for mine, theirs in zip(got, expected["rows"], strict=True):
        where = f"text {expected['text']!r} position {theirs['position']}"
        assert mine["position"] == theirs["position"], where
        assert mine["explanation_token_ids"] == theirs["explanation_token_ids"], (
            f"{where}: ours {mine['explanation_token_ids']} trainer "
            f"{theirs['explanation_token_ids']}"
        )
        assert mine["mse"] == pytest.approx(theirs["mse"], rel=1e-5), where
        assert mine["relative_rmse"] == pytest.approx(theirs["relative_rmse"], rel=1e-5), where
        assert mine["token_salience"] == pytest.approx(
            theirs["token_salience"], rel=1e-4, abs=1e-5
        ), where
        assert [e["token_id"] for e in mine["logit_lens_top"]] == theirs["logit_lens_top_ids"], (
            where
        )


@pytest.mark.parametrize("key", ["a", "d"])
@pytest.mark.parametrize("index", range(4))
def test_matches_the_trainer_outputs(parity_dir, lenses, key, index):
    expected = json.loads((parity_dir / "expected" / f"{key}__{index}.json").read_text())
    lens = lenses[key]
    result = analyze(
        lens,
        text=expected["text"],
        options=AnalysisOptions(temperature=0, logit_lens=True, batch_size=16),
    )
    compare_rows(result["rows"], expected)
    ids = torch.tensor([expected["input_ids"]])
    acts = lens.base.capture(ids, lens.config.layer_l)[0]
    want = torch.tensor([r["activation"] for r in expected["rows"]])
    assert torch.allclose(acts, want, rtol=1e-5, atol=1e-5)


def test_cli_json_matches_the_trainer_outputs(parity_dir):
    expected = json.loads((parity_dir / "expected" / "d__1.json").read_text())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "deployments.cli",
            "analyze",
            "--checkpoint",
            str(parity_dir / "ckpt_d_gemma2_L1"),
            "--base",
            str(parity_dir / "models" / "base_gemma2"),
            "--text",
            expected["text"],
            "--temperature",
            "0",
            "--logit-lens",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    compare_rows(result["rows"], expected)
