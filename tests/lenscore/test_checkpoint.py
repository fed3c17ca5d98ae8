import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lenscore import (
    CheckpointCorrupt,
    CheckpointMissing,
    CheckpointRefused,
    LensConfig,
    load_lens,
    read_checkpoint,
)
from lenscore.checkpoint import list_checkpoints


def test_run_directory_picks_highest_step_not_newest_file(demo_dir: Path):
    run = demo_dir / "lenses" / "gemma2-tiny-l1"  # the demo gives step 10 the older mtime
    files = {p.name: p for p in run.iterdir()}
    assert (
        files["checkpoint_step10_epoch2_.pt"].stat().st_mtime
        < files["checkpoint_step5_epoch1_.pt"].stat().st_mtime
    )
    raw = read_checkpoint(run)
    assert raw.step == 10 and raw.epoch == 2
    assert raw.path.name == "checkpoint_step10_epoch2_.pt"


def test_step_ties_go_to_the_newest_file(run_copy):
    run = run_copy("qwen2-tiny-l1")
    data = (run / "checkpoint_step10_epoch2_.pt").read_bytes()
    older, newer = run / "checkpoint_step10_epoch2_a.pt", run / "checkpoint_step10_epoch2_b.pt"
    older.write_bytes(data)
    newer.write_bytes(data)
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))
    os.utime(run / "checkpoint_step10_epoch2_.pt", (500_000, 500_000))
    assert list_checkpoints(run)[0] == newer


def test_compiled_prefix_is_stripped(demo_dir: Path):
    raw = read_checkpoint(demo_dir / "lenses" / "qwen2-tiny-l2-first2")
    keys = list(raw.decoder) + list(raw.encoder)
    assert "proj_weight" in raw.decoder and "proj.weight" in raw.encoder
    assert not any("_orig_mod" in k for k in keys)


def test_truncated_newest_file_falls_back_to_older_and_says_so(run_copy, caplog):
    run = run_copy("qwen2-tiny-l1")
    newest = run / "checkpoint_step10_epoch2_.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="lenscore.checkpoint"):
        raw = read_checkpoint(run)
    assert raw.step == 5
    assert [p for p, _ in raw.fell_back_from] == [newest]
    assert "checkpoint_step10_epoch2_.pt" in caplog.text and "older" in caplog.text


@pytest.mark.parametrize("keep", [100, 40_000, 0.9])
def test_truncated_file_is_a_corrupt_checkpoint(run_copy, keep):
    run = run_copy("qwen2-tiny-l2-first2")
    path = list_checkpoints(run)[0]
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointCorrupt) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(f"corrupt checkpoint {path}: ")
    with pytest.raises(CheckpointCorrupt) as err:
        read_checkpoint(run)  # the only file: nothing to fall back to
    assert "no older intact checkpoint" in str(err.value)


def test_garbage_and_plain_pickles_are_corrupt(tmp_path: Path):
    junk = tmp_path / "checkpoint_step1_epoch1_.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointCorrupt):
        read_checkpoint(junk)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"models": {}}))
    with pytest.raises(CheckpointCorrupt):
        read_checkpoint(legacy)


def test_missing_keys_are_corrupt(rewrite):
    path = rewrite("qwen2-tiny-l1", lambda blob: blob.pop("config"))
    with pytest.raises(CheckpointCorrupt, match="missing required key"):
        read_checkpoint(path)


def test_missing_paths(tmp_path: Path):
    with pytest.raises(CheckpointMissing):
        read_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointMissing, match="no checkpoint_step"):
        read_checkpoint(tmp_path)


class Payload:
    """A pickled object the allow-list must refuse."""


def test_foreign_pickled_globals_are_refused_by_name(rewrite):
    path = rewrite("qwen2-tiny-l1", lambda blob: blob.__setitem__("extra", Payload()))
    with pytest.raises(CheckpointRefused) as err:
        read_checkpoint(path)
    assert "Payload" in err.value.detail["global"]


def test_reading_never_restores_rng_state(demo_dir: Path, qwen_base):
    torch.manual_seed(1234)
    np.random.seed(99)
    torch_before, np_before = torch.get_rng_state(), np.random.get_state()
    load_lens(demo_dir / "lenses" / "qwen2-tiny-l1", qwen_base)
    assert torch.equal(torch.get_rng_state(), torch_before)
    np_after = np.random.get_state()
    assert np.array_equal(np_after[1], np_before[1]) and np_after[2] == np_before[2]


def test_only_lens_tensors_are_kept_and_unknown_config_keys_ignored(demo_dir: Path):
    raw = read_checkpoint(demo_dir / "lenses" / "qwen2-tiny-l1")
    assert raw.file_bytes > 2 * raw.tensor_bytes  # the file also carries optimizer state
    config = dict(raw.config, some_future_key={"x": 1})
    assert LensConfig.from_dict(config).layer_l == 1
