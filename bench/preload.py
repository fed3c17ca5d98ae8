"""Preloading: parallel vs serial preload, predictive host-tier hits, packed vs trainer disk switch.

Drives `GroupServer` in one process (no Ray; the in-process multiplexer has Serve's lock and
LRU contract) on a hidden-1024, 8-layer demo base with one lens per layer (distinct files,
each ~34 MB of lens tensors in a ~100 MB trainer file with optimizer state). Page cache is
warm for every read. The machine may be shared and busy: every ratio compares two things
measured in the same run, interleaved, and the medians of --repeats are reported. torch
runs --threads intra-op threads (default 1: Ray sets OMP_NUM_THREADS to a replica's whole
num_cpus, 1 by default), so one lens read uses one core, as in a replica.

- **Preload**: the wall time of loading every lens of the group at once (as
  `POST /preload` does) against the sum of loading each alone.
- **Predictive prefetch**: step through the layers' lenses in order, several sweeps, with a
  device slot for one lens and a host tier for three; the share of device misses served from
  the host tier (kinds `host` + `prefetch`) after the first sweep, with prefetch on and off.
  Between requests the replica is left idle until its prefetch has finished (a user reading
  the result); the prefetch time is printed.
- **Packed file**: disk switch time (`meta.switch.seconds` of a preload, host tier off)
  divided by a raw read of the same lens (mmap the trainer file, copy each lens tensor),
  reading the packed file and reading the trainer file.
- **What the machine allows**: the same reads in 2 threads vs 1 without the replica, and the
  milliseconds per lens of copying its tensors into new memory vs memory touched before. A
  read lands in new memory (page faults and zeroing, serialised in the kernel), so when the
  second number is a fraction of the first, threads cannot bring the first down much.

    python bench/preload.py [--tree DIR] [--repeats 5] [--small]

Targets (issue 11, on this CPU): parallel preload <= 0.6x the serial sum; predictive
host-tier hit rate >= 80% on the layer-stepping workload; packed disk switch <= 1.1x raw read.
`--small` runs a 64-wide, 8-layer demo in well under a minute: a smoke test, not numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from deployments.group_files import load_groups  # noqa: E402
from deployments.replica.server import GroupServer  # noqa: E402
from lenscore import read_checkpoint  # noqa: E402
from lenscore.checkpoint import list_checkpoints  # noqa: E402
from lenscore.packed import pack_checkpoint, read_for_serving  # noqa: E402

GIB = 1024**3
SOURCE_LENS = "qwen2-tiny-l1"  # patch_all_layers: one projection per layer, the largest lens
BODY = {"text": "Hello world.", "options": {"temperature": 0.0, "seed": 0}}


def build_tree(tree: Path, hidden: int, layers: int) -> None:
    """make_demo in a child process (its memory is returned when it exits)."""
    code = (
        "import sys; from pathlib import Path; from lenscore.demo import make_demo; "
        "make_demo(Path(sys.argv[1]), hidden_size=int(sys.argv[2]), n_layers=int(sys.argv[3]))"
    )
    subprocess.run([sys.executable, "-c", code, str(tree), str(hidden), str(layers)],
                   check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip


def write_layer_lenses(tree: Path, layers: int) -> list[dict[str, Any]]:
    """One lens run per layer (its own file), copied from SOURCE_LENS with layer_l changed."""
    source = list_checkpoints(tree / "lenses" / SOURCE_LENS)[0]
    blob = torch.load(source, weights_only=False)
    lenses = []
    for layer in range(layers):
        run = tree / "layer-lenses" / f"L{layer}"
        path = run / source.name
        if not path.is_file():
            run.mkdir(parents=True, exist_ok=True)
            blob["config"]["layer_l"] = layer
            blob["config"]["trainable_components"]["encoder"]["output_layer"] = layer
            torch.save(blob, path)
        lenses.append({"id": f"L{layer}", "name": f"layer {layer}", "checkpoint": str(run),
                       "layer": layer})  # fmt: skip
    return lenses


def make_group(tree: Path, work: Path, lenses: list[dict[str, Any]]) -> Any:
    data = {
        "group_id": "preload-bench",
        "name": "preload bench",
        "base_model": str(tree / "bases" / "qwen2-tiny"),
        "replica": {"max_lenses_per_replica": len(lenses), "host_cache_gb": 0.0, "num_gpus": 0},
        "lenses": lenses,
    }
    groups = work / "groups"
    groups.mkdir(parents=True, exist_ok=True)
    (groups / "bench.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_groups(groups)[0]


async def clear(server: GroupServer, **config: Any) -> None:
    """Drop every lens (device and host) and apply `config` as the new user_config."""
    await server.reconfigure({**config, "host_cache_gb": 0.0})
    await server.residency.free_device_memory()
    await server.reconfigure(config)


def drop_from_page_cache(paths: list[Path]) -> None:
    """Evict these files' pages (only theirs) from the page cache, so reads go to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


async def measure_preload(
    server: GroupServer,
    ids: list[str],
    repeats: int,
    cold: list[Path] | None = None,
    packed: Path | None = None,
) -> dict[str, Any]:
    """Median of (parallel preload wall time / serial sum).

    `cold`: drop these files from the page cache first; `packed`: the replica's
    `packed_cache_dir` (None: trainer files).
    """
    config: dict[str, Any] = {"max_lenses_per_replica": len(ids)}
    if packed is not None:
        config["packed_cache_dir"] = str(packed)
    ratios, parallel, serial = [], [], []
    for _ in range(repeats):
        # Serial: the same group preloaded one lens at a time, each staying loaded, so both
        # ways end holding every lens (and allocate the same memory).
        await clear(server, **config)
        drop_from_page_cache(cold or [])
        total = 0.0
        for lens_id in ids:
            started = time.perf_counter()
            await server.ensure_lens(lens_id=lens_id)
            total += time.perf_counter() - started
        await clear(server, **config)
        drop_from_page_cache(cold or [])
        before = server.snapshot().loads
        started = time.perf_counter()
        await asyncio.gather(*(server.ensure_lens(lens_id=lens_id) for lens_id in ids))
        wall = time.perf_counter() - started
        after = server.snapshot().loads
        if any(after[lens_id] - before.get(lens_id, 0) != 1 for lens_id in ids):
            raise RuntimeError(f"a parallel preload loaded some lens twice: {after}")
        ratios.append(wall / total)
        parallel.append(wall)
        serial.append(total)
    return {"ratio": statistics.median(ratios), "parallel_s": statistics.median(parallel),
            "serial_s": statistics.median(serial), "lenses": len(ids)}  # fmt: skip


def measure_ceiling(checkpoints: list[Path], repeats: int) -> float:
    """Median of (the same reads in two threads / one after another), without the replica.

    What this machine allows at the moment: on a busy 2-core machine, little.
    """
    ratios = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            held = [read_for_serving(path) for path in checkpoints]
            serial = time.perf_counter() - started
            del held
            started = time.perf_counter()
            held = list(pool.map(read_for_serving, checkpoints))
            ratios.append((time.perf_counter() - started) / serial)
            del held
    return statistics.median(ratios)


def measure_page_cost(checkpoints: list[Path], repeats: int) -> tuple[float, float]:
    """Milliseconds per lens to copy its tensors off the file into new vs reused memory.

    The gap is the cost of memory never touched before (page faults and zeroing), which a
    read into new tensors pays and which does not shrink with more threads.
    """
    raws = [read_checkpoint(path) for path in checkpoints]
    tensors = [[*raw.decoder.values(), *raw.encoder.values()] for raw in raws]
    reused = [[t.clone() for t in lens] for lens in tensors]
    fresh_ms, reused_ms = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        held = [[t.clone() for t in lens] for lens in tensors]
        fresh_ms.append((time.perf_counter() - started) * 1e3 / len(raws))
        del held
        started = time.perf_counter()
        for into, lens in zip(reused, tensors, strict=True):
            for out, t in zip(into, lens, strict=True):
                out.copy_(t)
        reused_ms.append((time.perf_counter() - started) * 1e3 / len(raws))
    return statistics.median(fresh_ms), statistics.median(reused_ms)


async def measure_stepping(
    server: GroupServer, ids: list[str], sweeps: int, host_gb: float, prefetch: bool
) -> dict[str, Any]:
    await clear(server, max_lenses_per_replica=1, host_cache_gb=host_gb,
                predictive_prefetch=prefetch)  # fmt: skip
    kinds, settle_s = [], []
    for _ in range(sweeps):
        for lens_id in ids:
            result = await server.analyze(BODY, lens_id=lens_id)
            kinds.append(result["meta"]["switch"]["kind"])
            started = time.perf_counter()
            await server.residency.prefetch.settle()  # the user reads the result meanwhile
            settle_s.append(time.perf_counter() - started)
    later = kinds[len(ids) :]  # the first sweep teaches the transitions
    misses = [k for k in later if k != "hit"]
    from_host = [k for k in misses if k in ("host", "prefetch")]
    await server.reconfigure({"predictive_prefetch": False})
    return {"hit_rate": len(from_host) / max(len(misses), 1), "misses": len(misses),
            "from_host": len(from_host), "prefetch_hits": later.count("prefetch"),
            "settle_s": statistics.median(settle_s)}  # fmt: skip


def raw_read_seconds(checkpoint: Path) -> float:
    """Seconds to bring a trainer file's lens tensors into memory (mmap, copy each)."""
    path = read_checkpoint(checkpoint).path
    started = time.perf_counter()
    again = read_checkpoint(path)
    copies = [t.clone() for t in (*again.decoder.values(), *again.encoder.values())]
    seconds = time.perf_counter() - started
    del copies
    return seconds


async def measure_disk(
    server: GroupServer, group: Any, ids: list[str], cache: Path | None, repeats: int
) -> dict[str, Any]:
    config: dict[str, Any] = {"max_lenses_per_replica": 1}
    if cache is not None:
        config["packed_cache_dir"] = str(cache)
    await clear(server, **config)
    a, b = ids[0], ids[1]
    await server.ensure_lens(lens_id=a)
    ratios, switches, raws = [], [], []
    for i in range(repeats * 2):
        lens_id = b if i % 2 == 0 else a
        raw_s = raw_read_seconds(group.lens(lens_id).checkpoint)
        switch = await server.ensure_lens(lens_id=lens_id)
        if switch["kind"] != "disk":
            raise RuntimeError(f"expected a disk switch, got {switch}")
        ratios.append(switch["seconds"] / raw_s)
        switches.append(switch["seconds"])
        raws.append(raw_s)
    await server.reconfigure({})
    return {"ratio": statistics.median(ratios), "switch_s": statistics.median(switches),
            "raw_s": statistics.median(raws)}  # fmt: skip


async def run(args: argparse.Namespace, tree: Path, work: Path) -> list[tuple[str, ...]]:
    lenses = write_layer_lenses(tree, args.layers)
    group = make_group(tree, work, lenses)
    ids = [lens["id"] for lens in lenses]
    server = GroupServer(group, device="cpu")
    for lens_id in ids:  # warm the page cache and the replica's first load
        raw_read_seconds(group.lens(lens_id).checkpoint)
    await server.ensure_lens(lens_id=ids[0])
    lens_bytes = server.snapshot().lens_bytes[ids[0]]
    files = [list_checkpoints(group.lens(lens_id).checkpoint)[0] for lens_id in ids]
    cache = work / "packed"
    packed_files = [pack_checkpoint(group.lens(lens_id).checkpoint, cache).tensors_path
                    for lens_id in ids]  # fmt: skip
    cold = await measure_preload(server, ids, args.repeats, cold=files)
    cold_packed = await measure_preload(server, ids, args.repeats, cold=packed_files,
                                        packed=cache)  # fmt: skip
    for lens_id in ids:  # back into the page cache for what follows
        raw_read_seconds(group.lens(lens_id).checkpoint)
    preload = await measure_preload(server, ids, args.repeats)
    await clear(server)
    ceiling = measure_ceiling([group.lens(lens_id).checkpoint for lens_id in ids], args.repeats)
    fresh_ms, reused_ms = measure_page_cost(files, args.repeats)
    host_gb = 3.5 * lens_bytes / GIB  # three lenses fit
    on = await measure_stepping(server, ids, args.sweeps, host_gb, prefetch=True)
    off = await measure_stepping(server, ids, args.sweeps, host_gb, prefetch=False)
    trainer = await measure_disk(server, group, ids, None, args.repeats)
    packed = await measure_disk(server, group, ids, cache, args.repeats)
    mb = lens_bytes / 1024**2
    n = len(ids)
    return [
        (f"preload of {n} lenses ({mb:.1f} MB each) from disk (files dropped from the page "
         "cache): parallel wall / serial sum", preload_text(cold), "<= 0.6",
         verdict(cold["ratio"] <= 0.6)),
        ("same, packed files (`lens-serve pack`) dropped from the page cache",
         preload_text(cold_packed), "<= 0.6", verdict(cold_packed["ratio"] <= 0.6)),
        ("same, files in the page cache (CPU-bound)", preload_text(preload), "<= 0.6",
         verdict(preload["ratio"] <= 0.6)),
        ("ceiling now: the same reads without the replica, 2 threads / 1 thread",
         f"{ceiling:.2f}", "-", "-"),
        ("ms per lens to copy its tensors off the file: into new memory / into memory "
         "touched before", f"{fresh_ms:.1f} / {reused_ms:.1f}", "-", "-"),
        (f"host-tier hit rate, stepping through {n} layers x {args.sweeps}, prefetch on",
         f"{on['hit_rate']:.0%} ({on['from_host']}/{on['misses']} misses; "
         f"{on['prefetch_hits']} prefetched; idle wait {on['settle_s'] * 1e3:.0f} ms)",
         ">= 80%", verdict(on["hit_rate"] >= 0.8)),
        ("same, prefetch off",
         f"{off['hit_rate']:.0%} ({off['from_host']}/{off['misses']} misses)", "-", "-"),
        ("disk switch / raw read, packed file", ratio_text(packed), "<= 1.1",
         verdict(packed["ratio"] <= 1.1)),
        ("disk switch / raw read, trainer file", ratio_text(trainer), "<= 1.5 (issue 3)",
         verdict(trainer["ratio"] <= 1.5)),
    ]  # fmt: skip


def preload_text(row: dict[str, Any]) -> str:
    return f"{row['ratio']:.2f} ({row['parallel_s']:.3f} s / {row['serial_s']:.3f} s)"


def ratio_text(row: dict[str, Any]) -> str:
    return f"{row['ratio']:.2f} ({row['switch_s'] * 1e3:.1f} ms / {row['raw_s'] * 1e3:.1f} ms)"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def print_table(rows: list[tuple[str, ...]]) -> None:
    print("| measure | result | target | |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, help="demo tree to use or build (default: tmp)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweeps", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="64-wide lenses: smoke test")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads; a Ray replica gets floor(num_cpus) (group default 1)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden, args.layers = (64, 8) if args.small else (1024, 8)
    if args.small:
        args.repeats, args.sweeps = min(args.repeats, 2), min(args.sweeps, 3)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one JSON line per switch
    work = Path(tempfile.mkdtemp(prefix="lens-preload-bench-"))
    tree = args.tree or work / "tree"
    if not (tree / "manifest.json").is_file():
        started = time.perf_counter()
        build_tree(tree, hidden, args.layers)
        print(f"built demo tree (hidden {hidden}, {args.layers} layers) in "
              f"{time.perf_counter() - started:.0f} s: {tree}")  # fmt: skip
    rows = asyncio.run(run(args, tree, work))
    print()
    print_table(rows)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
