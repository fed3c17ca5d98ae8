"""Packed lens files: the trainer file's tensors and analyses, never stale, never trusted."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lenscore import AnalysisOptions, analyze, load_lens, read_checkpoint
from lenscore import packed as packed_module
from lenscore.packed import pack_checkpoint, pack_key, read_for_serving, read_packed
from tests.lenscore.conftest import newest_file

REPO = Path(__file__).resolve().parents[2]
LENSES = [
    "qwen2-tiny-l1",
    "qwen2-tiny-l2-first2",
    "qwen2-tiny-l0-single",
    "qwen2-tiny-l1-donor",
    "gemma2-tiny-l1",
    "gemma2-tiny-l2-input",
    "gemma2-tiny-l0-first1",
]
TEXT = "The cat sat on the mat. Then it slept."


def assert_same_tensors(packed, trainer) -> None:
    for part in ("decoder", "encoder"):
        a, b = getattr(packed, part), getattr(trainer, part)
        assert a.keys() == b.keys(), part
        for key in a:
            assert a[key].dtype == b[key].dtype, (part, key)
            assert a[key].shape == b[key].shape, (part, key)
            assert torch.equal(a[key], b[key]), (part, key)


@pytest.mark.parametrize("lens_id", LENSES)
def test_packed_file_holds_the_trainer_files_lens_tensors_and_config(demo_dir, tmp_path, lens_id):
    checkpoint = demo_dir / "lenses" / lens_id
    written = pack_checkpoint(checkpoint, tmp_path)
    assert written.written and written.source == newest_file(checkpoint)
    packed = read_packed(checkpoint, tmp_path)
    trainer = read_checkpoint(checkpoint)
    assert packed is not None and packed.owned and packed.packed == written.tensors_path
    assert_same_tensors(packed, trainer)
    assert packed.config == trainer.config
    assert (packed.path, packed.step, packed.epoch) == (trainer.path, trainer.step, trainer.epoch)
    assert packed.tensor_bytes == trainer.tensor_bytes == written.tensor_bytes
    assert packed.file_bytes == trainer.file_bytes
    # The packed file is only the lens: no optimizer state.
    assert written.tensors_path.stat().st_size < trainer.file_bytes


@pytest.mark.parametrize(
    ("lens_id", "base"),
    [("qwen2-tiny-l1", "qwen"), ("qwen2-tiny-l0-single", "qwen"), ("gemma2-tiny-l1", "gemma"),
     ("gemma2-tiny-l2-input", "gemma"), ("qwen2-tiny-l1-donor", "qwen")],
)  # fmt: skip
def test_packed_lens_analyses_exactly_like_the_trainer_file(
    demo_dir, tmp_path, qwen_base, gemma_base, qwen_donor, lens_id, base
):
    base = qwen_base if base == "qwen" else gemma_base
    donor = qwen_donor if lens_id.endswith("donor") else None
    checkpoint = demo_dir / "lenses" / lens_id
    pack_checkpoint(checkpoint, tmp_path)
    options = AnalysisOptions(temperature=0.0, seed=3, kl=True, logit_lens=True)
    from_trainer = load_lens(checkpoint, base, donor=donor)
    from_packed = load_lens(
        checkpoint, base, donor=donor, raw=read_for_serving(checkpoint, packed_dir=tmp_path)
    )
    for name, tensor in from_trainer.tensors.items():
        assert torch.equal(tensor, from_packed.tensors[name]), name
        assert tensor.dtype == from_packed.tensors[name].dtype, name
    a = analyze(from_trainer, text=TEXT, options=options)
    b = analyze(from_packed, text=TEXT, options=options)
    for row_a, row_b in zip(a["rows"], b["rows"], strict=True):
        assert row_a == row_b, (row_a["position"], row_a, row_b)
    assert a["meta"]["checkpoint"] == b["meta"]["checkpoint"]


def test_stale_packed_file_is_ignored_and_repacking_replaces_it(run_copy, tmp_path, caplog):
    run_dir = run_copy("qwen2-tiny-l2-first2")
    cache = tmp_path / "cache"
    first = pack_checkpoint(run_dir, cache)
    source = first.source
    # The trainer rewrites the file: other values, other size and mtime.
    blob = torch.load(source, weights_only=False)
    blob["models"]["decoder"]["_orig_mod.prompt_left_emb"] += 1.0
    blob["extra"] = torch.zeros(10)
    torch.save(blob, source)
    with caplog.at_level(logging.WARNING, logger="lenscore.packed"):
        assert read_packed(run_dir, cache) is None
    assert not caplog.records  # stale is not an error: simply no packed file for the new key
    served = read_for_serving(run_dir, packed_dir=cache)
    assert served.packed is None and served.owned
    assert_same_tensors(served, read_checkpoint(run_dir))
    second = pack_checkpoint(run_dir, cache)
    assert second.written and second.key != first.key
    assert not first.tensors_path.exists() and not first.config_path.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [second.tensors_path.name, second.config_path.name]
    )
    again = read_packed(run_dir, cache)
    assert again is not None
    assert_same_tensors(again, read_checkpoint(run_dir))


def test_a_touched_source_file_makes_its_packed_file_stale(run_copy, tmp_path):
    run_dir = run_copy("qwen2-tiny-l1")
    written = pack_checkpoint(run_dir, tmp_path)
    stat = written.source.stat()
    os.utime(written.source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert read_packed(run_dir, tmp_path) is None
    assert pack_checkpoint(run_dir, tmp_path).written  # a new key: written again


def test_a_new_highest_step_file_has_no_packed_file_until_packed(run_copy, tmp_path):
    run_dir = run_copy("qwen2-tiny-l1")
    pack_checkpoint(run_dir, tmp_path)
    newest = newest_file(run_dir)
    shutil.copy(newest, run_dir / "checkpoint_step99_epoch9_.pt")
    assert read_packed(run_dir, tmp_path) is None
    assert read_for_serving(run_dir, packed_dir=tmp_path).path.name.startswith("checkpoint_step99")


def test_pack_key_covers_path_size_mtime_and_format(run_copy, tmp_path, monkeypatch):
    run_dir = run_copy("qwen2-tiny-l1")
    source = newest_file(run_dir)
    key = pack_key(source)
    other = tmp_path / "elsewhere.pt"
    shutil.copy2(source, other)  # same bytes and mtime, another path
    assert pack_key(other) != key
    monkeypatch.setattr(packed_module, "PACK_FORMAT_VERSION", packed_module.PACK_FORMAT_VERSION + 1)
    assert pack_key(source) != key


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "other_key", "bad_json"])
def test_unreadable_packed_file_falls_back_to_the_trainer_file_with_a_log_line(
    demo_dir, tmp_path, caplog, damage
):
    checkpoint = demo_dir / "lenses" / "gemma2-tiny-l1"
    written = pack_checkpoint(checkpoint, tmp_path)
    data = written.tensors_path.read_bytes()
    if damage == "truncate":
        written.tensors_path.write_bytes(data[: len(data) - 100])
    elif damage == "garbage_header":
        written.tensors_path.write_bytes(b"\xff" * 8 + data[8:])
    elif damage == "other_key":
        record = json.loads(written.config_path.read_text())
        record["key"] = "0" * 32
        written.config_path.write_text(json.dumps(record))
    else:
        written.config_path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="lenscore.packed"):
        assert read_packed(checkpoint, tmp_path) is None
    assert any("reading the trainer checkpoint" in r.getMessage() for r in caplog.records)
    served = read_for_serving(checkpoint, packed_dir=tmp_path)
    assert served.packed is None
    assert_same_tensors(served, read_checkpoint(checkpoint))


def test_packed_tensors_are_the_processs_own_memory(demo_dir, tmp_path):
    checkpoint = demo_dir / "lenses" / "qwen2-tiny-l1"
    written = pack_checkpoint(checkpoint, tmp_path)
    packed = read_packed(checkpoint, tmp_path)
    before = {k: t.clone() for k, t in packed.decoder.items()}
    written.tensors_path.write_bytes(b"\0" * written.tensors_path.stat().st_size)
    written.tensors_path.unlink()
    for key, tensor in packed.decoder.items():
        assert torch.equal(tensor, before[key]), key


def test_trainer_reads_for_serving_are_copied_off_the_mapping(demo_dir):
    checkpoint = demo_dir / "lenses" / "qwen2-tiny-l1"
    served = read_for_serving(checkpoint)
    assert served.owned and served.packed is None
    assert_same_tensors(served, read_checkpoint(checkpoint))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pack_command_packs_group_lenses_once_and_exits_2_on_user_errors(demo_dir, tmp_path):
    groups = tmp_path / "groups"
    groups.mkdir()
    lenses = [
        {"id": "a-l1", "name": "a", "checkpoint": str(demo_dir / "lenses" / "qwen2-tiny-l1"),
         "layer": 1},
        {"id": "a-l1-again", "name": "b", "checkpoint": str(demo_dir / "lenses" / "qwen2-tiny-l1"),
         "layer": 1},
        {"id": "a-l0", "name": "c",
         "checkpoint": str(demo_dir / "lenses" / "qwen2-tiny-l0-single"), "layer": 0},
    ]  # fmt: skip
    group = {
        "group_id": "packed-group",
        "name": "packed",
        "base_model": str(demo_dir / "bases" / "qwen2-tiny"),
        "replica": {"packed_cache_dir": "packed"},  # relative to the group file
        "lenses": lenses,
    }
    (groups / "g.yaml").write_text(json.dumps(group))
    out = cli("pack", "--groups", str(groups))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["packed", "fresh", "packed"], lines
    cache = groups / "packed"
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert read_packed(demo_dir / "lenses" / "qwen2-tiny-l1", cache) is not None
    missing = cli("pack", "--checkpoint", str(tmp_path / "nope"), "--cache-dir", str(cache))
    assert missing.returncode == 2 and "no checkpoint" in missing.stderr
    no_dir = cli("pack", "--checkpoint", str(demo_dir / "lenses" / "qwen2-tiny-l1"))
    assert no_dir.returncode == 2 and "--cache-dir" in no_dir.stderr
    del group["replica"]
    (groups / "g.yaml").write_text(json.dumps(group))
    unset = cli("pack", "--groups", str(groups))
    assert unset.returncode == 2 and "packed_cache_dir" in unset.stderr
