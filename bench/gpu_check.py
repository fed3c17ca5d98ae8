"""One prepared check for a CUDA machine: lens memory, switch times per tier, batching gain.

Builds a synthetic bf16 Qwen2-style base of a few GB (random weights, hidden 4096, 12
layers: ~3.6 GB) and three lenses of ~100-470 MB on the device, in the trainer's checkpoint
format, then drives `GroupServer` in one process (no Ray; the in-process multiplexer has
Serve's lock and LRU contract) on `cuda:0`:

1. bandwidth: host->device copies from pinned and from pageable memory (1 GiB), and a disk
   read of the largest trainer file from the disk (dropped from the page cache with
   posix_fadvise, this file only) and from the page cache;
2. CUDA memory per lens: `torch.cuda.memory_allocated` growth over a lens load, and the peak
   during it, each divided by the lens's tensor bytes (target: growth <= 1.1x);
3. switch times per tier (median `meta.switch.seconds`): hit, host (pinned host tier, copy on
   a side stream), prefetch, disk from the trainer file, disk from the packed file, each next
   to what the measured bandwidths predict (lens bytes / pinned H2D; + file bytes / read);
4. packed file == trainer file: the same lens analysed at temperature 0 from each (rows equal);
5. batching gain at 8 clients, mixed lenses: 8 concurrent clients, client i on lens i % 3,
   each sending ~60-token analyses back to back for --batch-seconds, with the batching
   scheduler on (`batch_max_rows` default) and off (0): rows/s ratio (target >= 3x).

Runs in about 4-6 minutes on an H100/H200-class GPU (--budget-s 450 stops starting new
sections after that). `--device cpu --small` is a dry run of every code path in under a
minute (hidden 256, 4 layers; timings meaningless).

    python bench/gpu_check.py                       # on the GPU machine
    python bench/gpu_check.py --device cpu --small  # anywhere

Expected output (numbers illustrative):

    gpu_check: torch 2.13.0, NVIDIA H200 (139.8 GiB), 16 CPUs, device cuda:0
    setup: base 3.62 GB bfloat16 (hidden 4096, 12 layers) in 24.1 s; lenses (device bytes):
      all-layers 470.0 MB, first2 134.3 MB, single 100.7 MB
    bandwidth: H2D pinned 51.2 GB/s, pageable 13.0 GB/s; disk read 2.9 GB/s, page cache 9.7 GB/s
    memory per lens: lens MB, CUDA growth / bytes, peak during load / bytes
      all-layers   470.0  1.00  1.86  ok
      first2       134.3  1.00  1.80  ok
      single       100.7  1.00  1.67  ok
    switches (all-layers lens, median of 4): seconds, predicted, ratio
      hit             0.0001
      host            0.0112  0.0092  1.22
      prefetch        0.0110  0.0092  1.20
      disk trainer    0.3410  0.3350  1.02
      disk packed     0.1630  0.1610  1.01
    packed == trainer at temperature 0: rows equal (62 rows)
    batching, 8 clients on 3 lenses: unbatched 410 rows/s, batched 1650 rows/s: 4.02x
      (target >= 3x) ok
    done in 291 s
    JSON {...one line with every number...}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from deployments.group_files import load_groups  # noqa: E402
from deployments.replica.server import GroupServer  # noqa: E402
from lenscore import demo, read_checkpoint  # noqa: E402
from lenscore.checkpoint import list_checkpoints  # noqa: E402
from lenscore.packed import pack_checkpoint  # noqa: E402

GB = 1e9
MB = 1e6
# (short name, demo recipe): all layers patched (P = n_layers), the first two, one projection.
LENSES = {"all-layers": "qwen2-tiny-l1", "first2": "qwen2-tiny-l2-first2",
          "single": "qwen2-tiny-l0-single"}  # fmt: skip
OPTIONS = {"temperature": 0.0, "seed": 0, "calculate_salience": False}


class Clock:
    """Elapsed time against --budget-s: a section starts only while time is left."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- setup -----------------------------------------------------------------------------------


def write_base(out: Path, hidden: int, layers: int, device: torch.device) -> tuple[Any, float]:
    """A random bf16 Qwen2-style base, initialised on the device (fast), saved as safetensors."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = demo.train_tokenizer("qwen2")
    config = demo._model_config("qwen2", tok, hidden, layers)
    config.initializer_range = 0.02
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(out)
    demo._write_tokenizer(out, "qwen2", tok)
    emb = model.get_input_embeddings().weight.detach().float().cpu()  # [V, d]
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return emb, nbytes


def write_lenses(root: Path, base_dir: Path, emb: torch.Tensor, layers: int) -> dict[str, Path]:
    """Trainer-format checkpoints (models + config only: no optimizer state) for LENSES."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    recipes = {recipe.lens_id: recipe for recipe in demo._LENSES}
    runs = {}
    for name, recipe_id in LENSES.items():
        recipe = recipes[recipe_id]
        decoder, encoder = demo._lens_tensors(recipe, tokenizer, emb, layers, 8)
        run = root / name
        run.mkdir(parents=True, exist_ok=True)
        blob = {"step": 8, "epoch": 1, "models": {"decoder": decoder, "encoder": encoder},
                "config": demo._lens_config(recipe, layers)}  # fmt: skip
        torch.save(blob, run / "checkpoint_step8_epoch1_.pt")
        runs[name] = run
    return runs


def lens_entry(name: str, run: Path, layer: int) -> dict[str, Any]:
    return {"id": name, "name": name, "checkpoint": str(run), "layer": layer, "batch_size": 64}


def make_server(work: Path, base_dir: Path, runs: dict[str, Path], device: str) -> GroupServer:
    layers = {"all-layers": 1, "first2": 2, "single": 0}
    data = {
        "group_id": "gpu-check",
        "name": "gpu check",
        "base_model": str(base_dir),
        "dtype": "bfloat16",
        "replica": {"max_lenses_per_replica": 3, "host_cache_gb": 4, "num_gpus": 0},
        "lenses": [lens_entry(name, run, layers[name]) for name, run in runs.items()],
    }
    (work / "groups").mkdir(exist_ok=True)
    (work / "groups" / "gpu-check.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return GroupServer(load_groups(work / "groups")[0], device=device)


# -- measurements ----------------------------------------------------------------------------


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_seconds(path: Path) -> float:
    buffer = bytearray(path.stat().st_size)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        view, got = memoryview(buffer), 0
        while got < len(buffer):
            got += f.readinto(view[got:]) or len(buffer)
    return time.perf_counter() - started


def measure_bandwidth(device: torch.device, largest_file: Path, nbytes: int) -> dict[str, float]:
    out: dict[str, float] = {}
    if device.type == "cuda":
        for kind, pinned in (("h2d_pinned", True), ("h2d_pageable", False)):
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            times = []
            for _ in range(5):
                sync(device)
                started = time.perf_counter()
                moved = host.to(device, non_blocking=pinned)
                sync(device)
                times.append(time.perf_counter() - started)
                del moved
            out[kind] = nbytes / statistics.median(times)
    else:
        out["h2d_pinned"] = out["h2d_pageable"] = float("inf")  # no copy on the CPU
    drop_from_page_cache(largest_file)
    size = largest_file.stat().st_size
    out["disk_read"] = size / read_seconds(largest_file)
    out["cache_read"] = size / statistics.median(read_seconds(largest_file) for _ in range(3))
    return out


async def clear(server: GroupServer, **config: Any) -> None:
    await server.reconfigure({**config, "host_cache_gb": 0.0})
    await server.residency.free_device_memory()
    await server.reconfigure(config)


async def measure_memory(server: GroupServer, device: torch.device) -> dict[str, dict]:
    await clear(server)
    rows = {}
    for name in LENSES:
        if device.type != "cuda":
            result = await server.ensure_lens(lens_id=name)
            rows[name] = {"bytes": result["bytes"], "growth": float("nan"), "peak": float("nan")}
            continue
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = await server.ensure_lens(lens_id=name)
        sync(device)
        growth = torch.cuda.memory_allocated(device) - before
        peak = torch.cuda.max_memory_allocated(device) - before
        rows[name] = {"bytes": result["bytes"], "growth": growth / result["bytes"],
                      "peak": peak / result["bytes"]}  # fmt: skip
    return rows


async def switch_series(server: GroupServer, pair: tuple[str, str], n: int) -> list[dict]:
    """Alternate between two lenses; return the switches of the first one."""
    seen = []
    for _ in range(n):
        for lens_id in pair:
            result = await server.ensure_lens(lens_id=lens_id)
            if lens_id == pair[0]:
                seen.append(result)
    return seen


async def measure_switches(server: GroupServer, cache: Path, n: int) -> dict[str, Any]:
    big, other = "all-layers", "first2"
    out: dict[str, Any] = {}
    await clear(server, max_lenses_per_replica=1)
    out["disk trainer"] = await switch_series(server, (big, other), n)
    await clear(server, max_lenses_per_replica=1, packed_cache_dir=str(cache))
    out["disk packed"] = await switch_series(server, (big, other), n)
    await clear(server, max_lenses_per_replica=1, host_cache_gb=4.0)
    await switch_series(server, (big, other), 1)  # both in the host tier from now on
    out["host"] = await switch_series(server, (big, other), n)
    await clear(server, max_lenses_per_replica=1, host_cache_gb=4.0)
    out["hit"] = [await server.ensure_lens(lens_id=big) for _ in range(n + 1)][1:]
    out["prefetch"] = await measure_prefetch(server, n)
    await clear(server)
    return out


async def measure_prefetch(server: GroupServer, n: int) -> list[dict]:
    """Step through the lenses with a 1-lens host tier budget: only prefetches can hit."""
    big_bytes = server.snapshot().lens_bytes.get("all-layers") or 0
    host_gb = 1.2 * big_bytes / 1024**3
    await clear(server, max_lenses_per_replica=1, host_cache_gb=host_gb, predictive_prefetch=True)
    seen = []
    for _ in range(n + 1):
        for lens_id in LENSES:
            body = {"text": "Hello world.", "options": OPTIONS}
            result = await server.analyze(body, lens_id=lens_id)
            if lens_id == "all-layers" and result["meta"]["switch"]["kind"] == "prefetch":
                seen.append(result["meta"]["switch"])
            await server.residency.prefetch.settle()
    await server.reconfigure({})
    return seen


def predicted(kind: str, lens_bytes: int, file_bytes: int, bw: dict[str, float]) -> float | None:
    h2d = lens_bytes / bw["h2d_pinned"]
    if kind in ("host", "prefetch"):
        return h2d
    if kind.startswith("disk"):
        return file_bytes / bw["cache_read"] + h2d  # warm page cache, as measured
    return None


async def check_packed_equal(server: GroupServer, cache: Path, text: str) -> dict[str, Any]:
    body = {"text": text, "options": OPTIONS}
    await clear(server)
    trainer = await server.analyze(body, lens_id="all-layers")
    await clear(server, packed_cache_dir=str(cache))
    packed = await server.analyze(body, lens_id="all-layers")
    await clear(server)
    equal = trainer["rows"] == packed["rows"]
    return {"equal": equal, "rows": len(trainer["rows"])}


async def measure_batching(server: GroupServer, texts: list[str], seconds: float) -> dict:
    names = list(LENSES)

    async def client(i: int, deadline: float, rows: list[int]) -> None:
        k = i
        while time.perf_counter() < deadline:
            body = {"text": texts[k % len(texts)], "options": OPTIONS}
            result = await server.analyze(body, lens_id=names[i % len(names)])
            rows[i] += len(result["rows"])
            k += 8

    out = {}
    for label, config in (("unbatched", {"batch_max_rows": 0}), ("batched", {})):
        await clear(server, **config)
        for name in names:  # all three lenses on the device first: no switches measured
            await server.ensure_lens(lens_id=name)
        rows = [0] * 8
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(i, deadline, rows) for i in range(8)))
        out[label] = sum(rows) / (time.perf_counter() - started)
    out["gain"] = out["batched"] / out["unbatched"]
    return out


# -- report ----------------------------------------------------------------------------------


def texts_of(n: int, words: int) -> list[str]:
    corpus = demo.DEMO_TEXT_PATH.read_text().split()
    return [" ".join(corpus[i * words : (i + 1) * words]) for i in range(n)]


def print_switches(switches: dict[str, Any], lens_bytes: int, file_bytes: int, bw: dict) -> dict:
    print(f"switches (all-layers lens, median of up to {max(map(len, switches.values()))}): "
          "seconds, predicted, ratio")  # fmt: skip
    summary = {}
    for kind in ("hit", "host", "prefetch", "disk trainer", "disk packed"):
        series = [s["seconds"] for s in switches.get(kind, [])]
        if not series:
            print(f"  {kind:<14} none")
            continue
        median = statistics.median(series)
        expect = predicted(kind, lens_bytes, file_bytes, bw)
        summary[kind] = {"seconds": median, "predicted": expect}
        line = f"  {kind:<14} {median:8.4f}"
        if expect:
            line += f"  {expect:8.4f}  {median / expect:5.2f}"
        print(line)
    return summary


async def run(args: argparse.Namespace, clock: Clock, work: Path) -> dict[str, Any]:
    device = torch.device(args.device)
    report: dict[str, Any] = {}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    print(f"gpu_check: torch {torch.__version__}, {name} ({total / 1024**3:.1f} GiB), "
          f"{os.cpu_count()} CPUs, device {device}")  # fmt: skip
    hidden, layers = (256, 4) if args.small else (args.hidden, args.layers)
    started = time.perf_counter()
    emb, base_bytes = write_base(work / "base", hidden, layers, device)
    runs = write_lenses(work / "lenses", work / "base", emb, layers)
    server = make_server(work, work / "base", runs, args.device)
    cache = work / "packed"
    for run_dir in runs.values():
        pack_checkpoint(run_dir, cache)
    memory = await measure_memory(server, device)
    sizes = ", ".join(f"{n} {m['bytes'] / MB:.1f} MB" for n, m in memory.items())
    print(f"setup: base {base_bytes / GB:.2f} GB bfloat16 (hidden {hidden}, {layers} layers) in "
          f"{time.perf_counter() - started:.1f} s; lenses (device bytes):\n  {sizes}")  # fmt: skip
    report["memory"] = memory
    largest = list_checkpoints(runs["all-layers"])[0]
    bw = measure_bandwidth(device, largest, (64 if args.small else 1024) * 1024**2)
    report["bandwidth"] = bw
    print(f"bandwidth: H2D pinned {bw['h2d_pinned'] / GB:.1f} GB/s, pageable "
          f"{bw['h2d_pageable'] / GB:.1f} GB/s; disk read {bw['disk_read'] / GB:.2f} GB/s, "
          f"page cache {bw['cache_read'] / GB:.2f} GB/s")  # fmt: skip
    print("memory per lens: lens MB, CUDA growth / bytes, peak during load / bytes")
    for lens, m in memory.items():
        ok = "ok" if m["growth"] <= 1.1 else ("n/a" if m["growth"] != m["growth"] else "OVER")
        print(f"  {lens:<12} {m['bytes'] / MB:8.1f}  {m['growth']:5.2f}  {m['peak']:5.2f}  {ok}")
    if clock.left() > 60:
        switches = await measure_switches(server, cache, args.repeats)
        file_bytes = read_checkpoint(largest).tensor_bytes  # lens bytes read from the file
        lens_bytes = memory["all-layers"]["bytes"]
        report["switches"] = print_switches(switches, lens_bytes, file_bytes, bw)
    if clock.left() > 30:
        report["packed_equal"] = await check_packed_equal(server, cache, texts_of(1, 45)[0])
        verdict = "rows equal" if report["packed_equal"]["equal"] else "ROWS DIFFER"
        print(f"packed == trainer at temperature 0: {verdict} "
              f"({report['packed_equal']['rows']} rows)")  # fmt: skip
    seconds = 3.0 if args.small else args.batch_seconds
    if clock.left() > 2 * seconds + 20:
        # ---- batching gain: the scheduler (deployments/replica/scheduler.py) in GroupServer
        batching = await measure_batching(server, texts_of(16, 45), seconds)
        report["batching"] = batching
        ok = "ok" if batching["gain"] >= 3 else "MISS"
        print(f"batching, 8 clients on 3 lenses: unbatched {batching['unbatched']:.0f} rows/s, "
              f"batched {batching['batched']:.0f} rows/s: {batching['gain']:.2f}x\n"
              f"  (target >= 3x) {ok}")  # fmt: skip
    else:
        print("batching: skipped (time budget)")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a dry run")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch-seconds", type=float, default=20.0)
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--work", type=Path, help="scratch directory (default: a tmp dir)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --device cpu --small for a dry run")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    torch.backends.cuda.matmul.allow_tf32 = False
    clock = Clock(args.budget_s)
    work = args.work or Path(tempfile.mkdtemp(prefix="lens-gpu-check-"))
    report = asyncio.run(run(args, clock, work))
    print(f"done in {time.perf_counter() - clock.started:.0f} s")
    print("JSON " + json.dumps(report, default=str))


if __name__ == "__main__":
    main()
