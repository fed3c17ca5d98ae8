"""lenscore: load trainer lens checkpoints on a shared base and compute what they explain.

torch + transformers only (no Ray, FastAPI or pydantic). The public surface is `__all__`;
DESIGN.md §Layout says where it sits.
"""

from lenscore.analyze import analyze, generate
from lenscore.base import Base, BaseInfo, load_base, read_base_info
from lenscore.chat import reply
from lenscore.checkpoint import RawCheckpoint, read_checkpoint
from lenscore.compat import LensConfig, check_compat
from lenscore.demo import make_demo
from lenscore.errors import (
    BadInput,
    BaseLoadError,
    Cancelled,
    CheckpointCorrupt,
    CheckpointMissing,
    CheckpointRefused,
    IncompatibleLens,
    LensError,
    OutOfDeviceMemory,
    TextTooLong,
)
from lenscore.lens import Lens, load_lens
from lenscore.options import AnalysisOptions

__all__ = [
    "AnalysisOptions",
    "BadInput",
    "Base",
    "BaseLoadError",
    "BaseInfo",
    "Cancelled",
    "CheckpointCorrupt",
    "CheckpointMissing",
    "CheckpointRefused",
    "IncompatibleLens",
    "Lens",
    "LensConfig",
    "LensError",
    "OutOfDeviceMemory",
    "RawCheckpoint",
    "TextTooLong",
    "analyze",
    "check_compat",
    "generate",
    "load_base",
    "load_lens",
    "make_demo",
    "read_base_info",
    "read_checkpoint",
    "reply",
]
