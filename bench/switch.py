"""Lens switch times by tier: resident, host tier, disk only, freshly started replica.

Drives `GroupServer` in one process (no Ray; the in-process multiplexer has Serve's LRU
contract) on the demo groups and on a larger CPU base (hidden 1024, 8 layers: base >> lens).
For each state it times a whole request (a short greedy analysis) and its switch part
(`meta.switch.seconds`: lock wait + eviction + load), the bytes moved, and the ratio of the
switch to a raw read of the same lens tensors (mmap the checkpoint, copy each lens tensor).
Page cache is warm for every read (same files read again), which favours no row.

    python bench/switch.py [--demo DIR] [--big DIR] [--repeats 5] [--no-big]

Targets (issue 3): disk switch <= 1.5x raw read; host switch >= 5x faster than disk;
within-group (disk) switch <= (lens / (base + lens)) x 1.5 of a cold start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from deployments.group_files import load_groups  # noqa: E402
from deployments.replica.server import GroupServer  # noqa: E402
from lenscore import read_checkpoint  # noqa: E402
from lenscore.demo import make_demo  # noqa: E402

# Short, so the analysis does not drown the switch in the request time.
BODY = {"text": "Hello world.", "options": {"temperature": 0.0}}
GIB = 1024**3


def write_group_files(demo: Path, out: Path) -> Path:
    """One group file per demo base, paths absolute, host tier on, no donors needed."""
    manifest = json.loads((demo / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for group_id, base_rel in manifest["bases"].items():
        lenses = [
            {"id": lens_id, "name": lens_id, "checkpoint": str(demo / e["checkpoint"]),
             "layer": e["layer"]}
            for lens_id, e in manifest["lenses"].items()
            if e["base"] == group_id and not e["donor"]
        ]  # fmt: skip
        data = {
            "group_id": group_id,
            "name": group_id,
            "base_model": str(demo / base_rel),
            "replica": {"max_lenses_per_replica": 1, "host_cache_gb": 4, "num_gpus": 0},
            "lenses": lenses,
        }
        (out / f"{group_id}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def raw_read_seconds(checkpoint: Path) -> float:
    """Seconds to bring the lens tensors of the newest checkpoint into memory."""
    raw = read_checkpoint(checkpoint)
    started = time.perf_counter()
    again = read_checkpoint(raw.path)
    copies = [t.clone() for t in (*again.decoder.values(), *again.encoder.values())]
    seconds = time.perf_counter() - started
    del copies
    return seconds


async def request(server: GroupServer, lens_id: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result = await server.analyze(BODY, lens_id=lens_id)
    return time.perf_counter() - started, result["meta"]["switch"]


async def measure_group(group: Any, repeats: int) -> list[dict[str, Any]]:
    a, b = group.lenses[0].lens_id, group.lenses[1].lens_id
    rows: dict[str, list[tuple[float, float]]] = {"fresh": [], "disk": [], "host": [], "hit": []}
    raw_ratio: list[float] = []
    raw_reads: list[float] = []
    for _ in range(repeats):  # a freshly started replica: base load + first lens
        started = time.perf_counter()
        server = GroupServer(group, device="cpu")
        _, switch = await request(server, a)
        cold_s = server.base_load_seconds + switch["seconds"]
        rows["fresh"].append((time.perf_counter() - started, cold_s))
    await server.reconfigure({"host_cache_gb": 0.0})  # evicted lenses go back to disk only
    for i in range(repeats * 2):
        lens_id = b if i % 2 == 0 else a
        # Interleaved with the switches, so both see the same machine load.
        raw_s = raw_read_seconds(group.lens(lens_id).checkpoint)
        seconds, switch = await request(server, lens_id)
        assert switch["kind"] == "disk", switch
        rows["disk"].append((seconds, switch["seconds"]))
        raw_reads.append(raw_s)
        raw_ratio.append(switch["seconds"] / raw_s)
    await server.reconfigure({"host_cache_gb": 4.0})
    await request(server, b)  # a is now in the host tier
    for i in range(repeats * 2):
        seconds, switch = await request(server, a if i % 2 == 0 else b)
        assert switch["kind"] == "host", switch
        rows["host"].append((seconds, switch["seconds"]))
    for _ in range(repeats * 2):
        seconds, switch = await request(server, b)
        assert switch["kind"] == "hit", switch
        rows["hit"].append((seconds, switch["seconds"]))
    # b is on the device, a in the host tier: bytes moved per switch average over both.
    lens_bytes = (server.residency.slots.resident()[0].nbytes + server.residency.host.nbytes) / 2
    base_bytes = server.residency.base_bytes
    raw = statistics.median(raw_reads)
    moved = {"fresh": base_bytes + lens_bytes, "disk": lens_bytes, "host": lens_bytes, "hit": 0}
    table = []
    for state in ("hit", "host", "disk", "fresh"):
        switch_s = statistics.median(s for _, s in rows[state])
        table.append(
            {"group": group.group_id, "state": state,
             "request_s": statistics.median(r for r, _ in rows[state]), "switch_s": switch_s,
             "bytes": int(moved[state]), "raw_read_s": raw,
             "vs_raw": statistics.median(raw_ratio) if state == "disk" else switch_s / raw,
             "base_bytes": base_bytes, "lens_bytes": lens_bytes}
        )  # fmt: skip
    return table


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'group':<18}{'state':<7}{'request s':>11}{'switch s':>11}{'bytes moved':>14}"
    header += f"{'raw read s':>12}{'switch/raw':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['group']:<18}{r['state']:<7}{r['request_s']:>11.4f}{r['switch_s']:>11.4f}"
            f"{r['bytes']:>14,}{r['raw_read_s']:>12.4f}{r['vs_raw']:>12.2f}"
        )


def print_targets(rows: list[dict[str, Any]]) -> None:
    by = {(r["group"], r["state"]): r for r in rows}
    for group in dict.fromkeys(r["group"] for r in rows):
        disk, host, fresh = by[(group, "disk")], by[(group, "host")], by[(group, "fresh")]
        share = disk["lens_bytes"] / (disk["base_bytes"] + disk["lens_bytes"])
        checks = [
            ("disk switch / raw read", disk["vs_raw"], "<=", 1.5),
            ("disk / host switch", disk["switch_s"] / max(host["switch_s"], 1e-9), ">=", 5.0),
            ("disk switch / cold start", disk["switch_s"] / fresh["switch_s"], "<=", share * 1.5),
        ]
        for name, value, op, target in checks:
            ok = value <= target if op == "<=" else value >= target
            print(
                f"{group:<18}{name:<26}{value:>10.3f} {op} {target:<8.3f} {'ok' if ok else 'MISS'}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="demo tree (default: build one in a tmp dir)")
    parser.add_argument("--big", type=Path, help="hidden-1024 demo tree (default: build one)")
    parser.add_argument("--no-big", action="store_true", help="skip the larger CPU base")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one JSON line per switch
    work = Path(tempfile.mkdtemp(prefix="lens-switch-bench-"))
    trees = [("demo", args.demo)] + ([] if args.no_big else [("big", args.big)])
    rows: list[dict[str, Any]] = []
    for name, tree in trees:
        if tree is None or not (tree / "manifest.json").is_file():
            tree = tree or work / name
            size = {"hidden_size": 1024, "n_layers": 8} if name == "big" else {}
            make_demo(tree, **size)
        for group in load_groups(write_group_files(tree, work / f"groups-{name}")):
            if name == "big":
                group = group.model_copy(update={"group_id": f"{group.group_id}-1024"})
            rows += asyncio.run(measure_group(group, args.repeats))
    print_table(rows)
    print()
    print_targets(rows)


if __name__ == "__main__":
    main()
