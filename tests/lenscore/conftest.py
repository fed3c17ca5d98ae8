"""Fixtures for lenscore tests: loaded demo bases and a way to rewrite checkpoints."""

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lenscore import Base, load_base


@pytest.fixture(scope="session")
def qwen_base(demo_dir: Path) -> Base:
    return load_base(demo_dir / "bases" / "qwen2-tiny")


@pytest.fixture(scope="session")
def gemma_base(demo_dir: Path) -> Base:
    return load_base(demo_dir / "bases" / "gemma2-tiny")


@pytest.fixture(scope="session")
def qwen_donor(demo_dir: Path) -> Base:
    return load_base(demo_dir / "donors" / "qwen2-tiny-donor")


def newest_file(run_dir: Path) -> Path:
    from lenscore.checkpoint import list_checkpoints

    return list_checkpoints(run_dir)[0]


@pytest.fixture
def rewrite(demo_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """Copy a demo lens's newest checkpoint into tmp after `edit(blob)` changed it."""

    def make(lens_id: str, edit: Callable[[dict], None], name: str = "edited") -> Path:
        src = newest_file(demo_dir / "lenses" / lens_id)
        blob = torch.load(src, weights_only=False)
        edit(blob)
        out = tmp_path / name
        out.mkdir()
        path = out / src.name
        torch.save(blob, path)
        return path

    return make


@pytest.fixture
def run_copy(demo_dir: Path, tmp_path: Path) -> Callable[[str], Path]:
    """A writable copy of a demo lens's run directory."""

    def make(lens_id: str) -> Path:
        out = tmp_path / lens_id
        shutil.copytree(demo_dir / "lenses" / lens_id, out)
        return out

    return make
