"""Memory and load-time cost of each extra lens on a shared base.

For every base of a demo tree: load the base (time, bytes), then load each of its lenses on it
and report the lens load time, its tensor bytes, the process RSS growth (/proc/self/statm) and
the time to read the same tensors raw from the file into process memory (torch.load with
mmap + one copy of each lens tensor). Targets (issue): RSS growth per lens <= 1.1x tensor
bytes; lens load <= 1.5x raw read.

    PYTHONPATH=. python bench/lens_memory.py                       # the 64-wide demo
    PYTHONPATH=. python bench/lens_memory.py --hidden 1024 --layers 8
    PYTHONPATH=. python bench/lens_memory.py --demo .demo          # an existing tree

Both times end with the tensors in memory the process owns: "load" is load_lens (it copies
them off the mapping), "raw" is the mmap read plus one copy of each lens tensor; each is the
best of --repeat tries. The
tree is built in a child process and glibc's mmap threshold is pinned (the bench re-executes
itself with MALLOC_MMAP_THRESHOLD_ set), because freed heap memory that glibc keeps resident
would otherwise hide every later allocation from RSS. With the 64-wide demo a lens is ~100 KB,
below the noise of page-granular RSS: read the ratios from the larger sizes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RSS_TARGET = 1.1  # RSS growth / tensor bytes
LOAD_TARGET = 1.5  # load_lens seconds / raw read seconds
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
ALLOWED_GLOBALS = [
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
    np._core.multiarray._reconstruct,
]


def rss_bytes() -> int:
    """Resident set size of this process (file-backed mmap pages included)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def touch(tensors) -> float:
    """Read every element once, so mmapped pages are really faulted in."""
    total = 0.0
    for t in tensors:
        total += float(t.sum())
    return total


def raw_read_seconds(path: Path, repeat: int) -> float:
    """Best time of `repeat` reads of the lens tensors straight from the file."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        models = blob["models"]
        # A read into memory the process owns: the least any loader pays that must not
        # depend on the file afterwards (a file rewritten in place under a live mmap would
        # crash the replica with SIGBUS, so lenscore copies).
        copies = [t.clone() for t in (*models["decoder"].values(), *models["encoder"].values())]
        best = min(best, time.perf_counter() - started)
        del blob, models, copies
    return best


def build_tree(args: argparse.Namespace, scratch: Path) -> Path:
    """Return a demo tree: the one named by --demo, else a fresh one built in a child process."""
    if args.demo is not None:
        return args.demo
    started = time.perf_counter()
    code = (
        "import sys; from pathlib import Path; from lenscore.demo import make_demo; "
        "make_demo(Path(sys.argv[1]), hidden_size=int(sys.argv[2]), n_layers=int(sys.argv[3]))"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(scratch), str(args.hidden), str(args.layers)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    print(
        f"built demo tree (hidden {args.hidden}, {args.layers} layers) in {scratch} "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return scratch


def measure_lens(lens_id: str, entry: dict, tree: Path, base, donor, repeat: int) -> dict:
    """Load one lens on `base` and return its row of the table (the lens stays alive in it)."""
    from lenscore import load_lens, read_checkpoint

    run_dir = tree / entry["checkpoint"]
    raw = read_checkpoint(run_dir)
    path, file_bytes = raw.path, raw.file_bytes
    del raw
    raw_s = raw_read_seconds(path, repeat)
    load_s = float("inf")
    for attempt in range(repeat):
        gc.collect()
        before = rss_bytes()
        started = time.perf_counter()
        # load_lens copies the tensors into owned memory: they are resident when it returns.
        lens = load_lens(run_dir, base, donor=donor, lens_id=lens_id)
        load_s = min(load_s, time.perf_counter() - started)
        gc.collect()
        growth = rss_bytes() - before
        if attempt < repeat - 1:
            del lens
    return {
        "lens_id": lens_id,
        "file_bytes": file_bytes,
        "tensor_bytes": lens.nbytes,
        "load_s": load_s,
        "raw_s": raw_s,
        "rss_growth_bytes": growth,
        "lens": lens,
    }


def print_row(row: dict, note: str = "") -> None:
    load_ratio = row["load_s"] / row["raw_s"] if row["raw_s"] > 0 else float("inf")
    rss_ratio = row["rss_growth_bytes"] / row["tensor_bytes"] if row["tensor_bytes"] else 0.0
    ok = "ok" if load_ratio <= LOAD_TARGET and rss_ratio <= RSS_TARGET else "OVER"
    print(
        f"  {row['lens_id']:<24} {row['file_bytes'] / MB:9.2f} {row['tensor_bytes'] / MB:9.2f} "
        f"{row['load_s'] * 1e3:9.1f} {row['raw_s'] * 1e3:9.1f} {load_ratio:7.2f} "
        f"{row['rss_growth_bytes'] / MB:9.2f} {rss_ratio:7.2f}  {note or ok}"
    )
    row["verdict"] = note or ok
    row["load_ratio"], row["rss_ratio"] = load_ratio, rss_ratio


def bench_base(tree: Path, manifest: dict, base_id: str, args: argparse.Namespace) -> list[dict]:
    """Load one base (and the donors its lenses need), then every lens of it; print rows."""
    from lenscore import load_base

    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    base = load_base(tree / manifest["bases"][base_id], dtype="float32")
    seconds = time.perf_counter() - started
    touch(base.model.parameters())  # safetensors maps lazily: make the base resident first
    print(
        f"\nbase {base_id}: load {seconds:.2f}s, {base.nbytes / MB:.2f} MB tensors, "
        f"RSS +{(rss_bytes() - before) / MB:.2f} MB once touched"
    )
    lenses = {i: e for i, e in manifest["lenses"].items() if e["base"] == base_id}
    donors = {}
    for donor_id in sorted({e["donor"] for e in lenses.values() if e["donor"]}):
        started = time.perf_counter()
        donors[donor_id] = load_base(tree / manifest["donors"][donor_id], dtype="float32")
        print(f"donor {donor_id}: load {time.perf_counter() - started:.2f}s")
    print(
        f"  {'lens_id':<24} {'file_MB':>9} {'tensor_MB':>9} {'load_ms':>9} {'raw_ms':>9} "
        f"{'ld/raw':>7} {'rss_MB':>9} {'rss/t':>7}  verdict"
    )
    rows = []
    # The first load pays one-time costs (lazy imports, allocator arenas): shown, not judged.
    first_id = next(iter(lenses))
    warm = measure_lens(first_id, lenses[first_id], tree, base, None, args.repeat)
    print_row(warm, note="warm-up")
    for lens_id, entry in lenses.items():
        donor = donors.get(entry["donor"]) if entry["donor"] else None
        row = measure_lens(lens_id, entry, tree, base, donor, args.repeat)
        print_row(row)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="existing demo tree (has manifest.json)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of a fresh tree")
    parser.add_argument("--layers", type=int, default=3, help="layers of a fresh tree (>= 3)")
    parser.add_argument("--repeat", type=int, default=3, help="raw reads per lens (best kept)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if MMAP_THRESHOLD_ENV not in os.environ:
        env = {**os.environ, MMAP_THRESHOLD_ENV: str(128 * 1024)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    with tempfile.TemporaryDirectory(prefix="lens-memory-") as scratch:
        tree = build_tree(args, Path(scratch))
        manifest = json.loads((tree / "manifest.json").read_text())
        print(f"targets: RSS growth <= {RSS_TARGET}x tensor bytes, load <= {LOAD_TARGET}x raw read")
        rows = []
        for base_id in manifest["bases"]:
            rows += bench_base(tree, manifest, base_id, args)
            gc.collect()
    over = [r["lens_id"] for r in rows if r["verdict"] != "ok"]
    print(f"\n{len(rows) - len(over)}/{len(rows)} lenses within both targets", end="")
    print(f"; over: {', '.join(over)}" if over else "")
    if args.json is not None:
        keep = [{k: v for k, v in r.items() if k != "lens"} for r in rows]
        args.json.write_text(json.dumps(keep, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
