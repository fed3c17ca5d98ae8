"""The `lens-serve` analyze / inspect commands as a user runs them (a real subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROW_FIELDS = {
    "position",
    "token",
    "token_id",
    "explanation",
    "explanation_tokens",
    "explanation_token_ids",
    "mse",
    "relative_rmse",
    "token_salience",
}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_analyze_json_has_exactly_the_row_fields(demo_dir):
    out = cli(
        "analyze",
        "--checkpoint",
        str(demo_dir / "lenses" / "qwen2-tiny-l1-donor"),
        "--base",
        str(demo_dir / "bases" / "qwen2-tiny"),
        "--donor",
        str(demo_dir / "donors" / "qwen2-tiny-donor"),
        "--text",
        "Rivers run to the sea.",
        "--temperature",
        "0",
        "--logit-lens",
        "--kl",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"meta", "rows"}
    assert result["meta"]["donor"].endswith("qwen2-tiny-donor")
    for row in result["rows"]:
        assert set(row) == ROW_FIELDS | {"logit_lens_top", "kl"}
        assert len(row["explanation_token_ids"]) == result["meta"]["t_text"]
        assert set(row["logit_lens_top"][0]) == {"token", "token_id", "logit"}


def test_analyze_table_and_messages_file(demo_dir, tmp_path):
    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Is the mill open?"}]))
    out = cli(
        "analyze",
        "--checkpoint",
        str(demo_dir / "lenses" / "gemma2-tiny-l1"),
        "--base",
        str(demo_dir / "bases" / "gemma2-tiny"),
        "--messages-file",
        str(messages),
        "--temperature",
        "0",
        "--no-salience",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("lens gemma2-tiny-l1")
    assert "explanation" in out.stdout.splitlines()[1]


def test_incompatible_lens_is_one_line_and_exit_2(demo_dir):
    out = cli(
        "analyze",
        "--checkpoint",
        str(demo_dir / "lenses" / "qwen2-tiny-l1"),
        "--base",
        str(demo_dir / "bases" / "gemma2-tiny"),
        "--text",
        "Hello there.",
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "is incompatible" in lines[0]


def test_corrupt_checkpoint_is_exit_2_and_bad_option_too(demo_dir, tmp_path):
    src = demo_dir / "lenses" / "qwen2-tiny-l2-first2" / "checkpoint_step8_epoch1_.pt"
    broken = tmp_path / "checkpoint_step8_epoch1_.pt"
    broken.write_bytes(src.read_bytes()[:5000])
    out = cli(
        "analyze",
        "--checkpoint",
        str(broken),
        "--base",
        str(demo_dir / "bases" / "qwen2-tiny"),
        "--text",
        "Hello there.",
    )
    assert out.returncode == 2
    assert out.stderr.strip() == out.stderr.strip().splitlines()[0]
    assert f"corrupt checkpoint {broken}" in out.stderr
    out = cli(
        "analyze",
        "--checkpoint",
        str(src.parent),
        "--base",
        str(demo_dir / "bases" / "qwen2-tiny"),
        "--text",
        "Hello there.",
        "--temperature",
        "3",
    )
    assert out.returncode == 2 and "temperature must be a number within 0..2" in out.stderr


def test_inspect_reports_sizes(demo_dir):
    out = cli(
        "inspect", "--checkpoint", str(demo_dir / "lenses" / "gemma2-tiny-l2-input"), "--json"
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["layer_l"] == 2 and info["step"] == 8
    assert info["tensors"]["decoder.proj_weight"]["shape"] == [1, 64, 64]
    assert 0 < info["lens_bytes"] < info["file_bytes"]


def test_lenscore_imports_no_ray_or_web_stack():
    code = (
        "import sys, lenscore, lenscore.demo, deployments.cli; "
        "print(sorted(m for m in ('ray', 'fastapi', 'pydantic', 'starlette') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
