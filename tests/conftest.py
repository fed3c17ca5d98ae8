"""Session fixtures shared by every test package: the demo tree and the parity sample."""

import os
from pathlib import Path

import pytest
import torch

# Parity checks compare float32 numbers whose greedy top-1/top-2 gaps can be ~4e-4
# (LENS_FORMAT §Parity notes): TF32 matmuls would flip tokens on a GPU.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_ENV = "LENS_SERVE_TEST_DEMO"


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tree of `make_demo`, built once per session (or `$LENS_SERVE_TEST_DEMO`)."""
    prebuilt = os.environ.get(DEMO_ENV)
    if prebuilt and (Path(prebuilt) / "manifest.json").is_file():
        return Path(prebuilt)
    from lenscore.demo import make_demo

    out = tmp_path_factory.mktemp("demo")
    make_demo(out)
    return out


@pytest.fixture(scope="session")
def demo_manifest(demo_dir: Path) -> dict:
    """The demo's manifest.json as a dict (paths relative to `demo_dir`)."""
    import json

    return json.loads((demo_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The trainer-made parity sample, vendored under tests/data so a plain clone has it."""
    return REPO_ROOT / "tests" / "data" / "parity-sample"
