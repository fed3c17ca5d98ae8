"""Best-of-k cost: wall time and rows/s of `analyze` for k in {1, 4, 8, 16}, before and after.

"before" is lenscore's unshared reference path (`analyze(..., shared=False)`: every sample
runs the whole decoder prompt and the whole encoder input), "after" the shared path of issue
12 (left prompt once per batch, slot + right prompt once per position, cache expanded to the
k samples; encoder soft prompt once per call). Both use the same sampler, so they choose the
same ids and the table checks that; the old per-row `torch.Generator` loop is gone from both,
so "before" is a little faster than lenscore was before issue 12.

Options are the analysis defaults (temperature 1, salience on, batch size 32) plus a seed.
Bases: the demo's Qwen2 and Gemma2 (hidden 64, 3 layers) and a larger Qwen2 (hidden 1024,
8 layers) on which only the last `--big-positions` positions are analysed. Texts: one
sentence and the first ~300 tokens of the demo text. Each cell is the best of `--repeats`
runs (`--big-repeats` on the larger base), before and after interleaved so both see the
same machine load. Both clocks are kept: wall time, and the process's CPU time, which other
processes on a shared machine disturb far less (with `--threads 1` it is the wall time an
idle machine would show). `--clock` picks the one the table and the targets use; the load
average is printed with the table.

    python bench/bestofk.py                         # all of it: a few minutes on 2 cores
    python bench/bestofk.py --quick                 # demo bases, k in {1, 8}, one repeat
    python bench/bestofk.py --threads 1 --clock cpu # a busy shared machine

Targets (issue 12), read from the "after" rows on the ~300-token text: best-of-8 <= 2.5x
best-of-1, best-of-16 <= 4x best-of-1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lenscore import AnalysisOptions, analyze, load_base, load_lens  # noqa: E402
from lenscore.demo import DEMO_TEXT_PATH, make_demo  # noqa: E402

SHORT_TEXT = "The farmers planted wheat in the valley, and the river ran past the old mill."
LONG_TOKENS = 300
SEED = 1234
PATHS = {"before": False, "after": True}  # name -> analyze(shared=...)
TARGETS = {8: 2.5, 16: 4.0}  # after-path time of best-of-k / best-of-1, ~300-token text
LENSES = (  # (table label, tree name, base id, lens id)
    ("qwen2 d=64", "demo", "qwen2-tiny", "qwen2-tiny-l1"),
    ("gemma2 d=64", "demo", "gemma2-tiny", "gemma2-tiny-l1"),
    ("qwen2 d=1024", "big", "qwen2-tiny", "qwen2-tiny-l1"),
)


def long_text(tokenizer: Any) -> str:
    """The first ~LONG_TOKENS tokens of the demo text, as text."""
    ids = tokenizer(DEMO_TEXT_PATH.read_text(), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: LONG_TOKENS - 1])


def timed(
    lens: Any, text: str, options: AnalysisOptions, shared: bool
) -> tuple[dict[str, float], list]:
    """Wall and CPU seconds of one analysis, and its explanation ids."""
    wall, cpu = time.perf_counter(), time.process_time()
    rows = analyze(lens, text=text, options=options, shared=shared)["rows"]
    seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    return seconds, [r["explanation_token_ids"] for r in rows]


def measure(lens: Any, text: str, k: int, positions: int | None, repeats: int) -> dict[str, Any]:
    """Best-of-`repeats` seconds of the unshared and shared paths for one (text, k)."""
    n_tokens = len(lens.base.tokenizer(text)["input_ids"])
    chosen = None if positions is None else tuple(range(max(n_tokens - positions, 0), n_tokens))
    options = AnalysisOptions(temperature=1.0, seed=SEED, best_of_k=k, positions=chosen)
    best = {f"{path}_{clock}": float("inf") for path in PATHS for clock in ("wall", "cpu")}
    ids: dict[str, list] = {}
    for _ in range(repeats):
        for name, shared in PATHS.items():
            seconds, ids[name] = timed(lens, text, options, shared)
            for clock, value in seconds.items():
                best[f"{name}_{clock}"] = min(best[f"{name}_{clock}"], value)
    rows = len(ids["after"])
    same = sum(a == b for a, b in zip(ids["before"], ids["after"], strict=True))
    return {"tokens": n_tokens, "rows": rows, "k": k, "same": same, **best}


def bench_lens(label: str, lens: Any, ks: list[int], args: argparse.Namespace) -> list[dict]:
    big = label.endswith("1024")
    positions = args.big_positions if big else None
    repeats = args.big_repeats if big else args.repeats
    texts = [("short", SHORT_TEXT), ("~300", long_text(lens.base.tokenizer))]
    timed(lens, SHORT_TEXT, AnalysisOptions(temperature=1.0, seed=SEED, best_of_k=2), True)
    out = []
    for text_name, text in texts:
        for k in ks:
            row = {"base": label, "text": text_name}
            row.update(measure(lens, text, k, positions, repeats))
            out.append(row)
            print(
                f"  {label:<13} {text_name:<6} k={k:<3} before {row['before_wall']:8.3f}s "
                f"(cpu {row['before_cpu']:8.3f}s) after {row['after_wall']:8.3f}s "
                f"(cpu {row['after_cpu']:8.3f}s)",
                flush=True,
            )
    return out


def print_table(rows: list[dict], clock: str) -> None:
    """One markdown row per (base, text, k); times and rates on `clock`."""
    ones = {(r["base"], r["text"]): r for r in rows if r["k"] == 1}
    print(
        f"| base | text (tokens) | rows | k | before s ({clock}) | after s ({clock}) | speed-up "
        "| before rows/s | after rows/s | before / k=1 | after / k=1 | same ids |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        before, after = r[f"before_{clock}"], r[f"after_{clock}"]
        one = ones.get((r["base"], r["text"]))
        rel_b = f"{before / one[f'before_{clock}']:.2f}x" if one else "-"
        rel_a = f"{after / one[f'after_{clock}']:.2f}x" if one else "-"
        print(
            f"| {r['base']} | {r['text']} ({r['tokens']}) | {r['rows']} | {r['k']} "
            f"| {before:.3f} | {after:.3f} | {before / after:.2f}x "
            f"| {r['rows'] / before:.1f} | {r['rows'] / after:.1f} "
            f"| {rel_b} | {rel_a} | {r['same']}/{r['rows']} |"
        )


def print_targets(rows: list[dict], clock: str) -> None:
    """Best-of-8 and best-of-16 against best-of-1 on the ~300-token text, after the change."""
    ones = {r["base"]: r for r in rows if r["k"] == 1 and r["text"] == "~300"}
    for r in rows:
        if r["text"] != "~300" or r["k"] not in TARGETS or r["base"] not in ones:
            continue
        ratio = r[f"after_{clock}"] / ones[r["base"]][f"after_{clock}"]
        verdict = "ok" if ratio <= TARGETS[r["k"]] else "MISS"
        print(
            f"{r['base']:<13} best-of-{r['k']:<2} / best-of-1 = {ratio:5.2f}x {clock} "
            f"(target <= {TARGETS[r['k']]}x) {verdict}"
        )


def load() -> str:
    """The machine's 1/5/15-minute load averages, for reading the wall times."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"


def trees(args: argparse.Namespace, scratch: Path) -> dict[str, Path]:
    """Demo trees by name, built in `scratch` unless given."""
    out = {"demo": args.demo or scratch / "demo"}
    if not args.no_big:
        out["big"] = args.big or scratch / "big"
    for name, tree in out.items():
        if not (tree / "manifest.json").is_file():
            size = {"hidden_size": 1024, "n_layers": 8} if name == "big" else {}
            started = time.perf_counter()
            make_demo(tree, **size)
            print(f"built {name} tree in {tree} in {time.perf_counter() - started:.1f}s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="demo tree (default: build one in a tmp dir)")
    parser.add_argument("--big", type=Path, help="hidden-1024 demo tree (default: build one)")
    parser.add_argument("--no-big", action="store_true", help="skip the larger CPU base")
    parser.add_argument("--quick", action="store_true", help="demo bases, k in {1, 8}, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument(
        "--big-positions", type=int, default=8, help="positions analysed on the larger base"
    )
    args = parser.parse_args()
    if args.quick:
        args.no_big, args.repeats = True, 1
    ks = [1, 8] if args.quick else [1, 4, 8, 16]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "sequence length is longer than the maximum" for 8k
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {load()}")
    with tempfile.TemporaryDirectory(prefix="lens-bestofk-") as scratch:
        paths = trees(args, Path(scratch))
        rows: list[dict] = []
        for label, tree_name, base_id, lens_id in LENSES:
            if tree_name not in paths:
                continue
            tree = paths[tree_name]
            base = load_base(tree / "bases" / base_id)
            lens = load_lens(tree / "lenses" / lens_id, base)
            rows += bench_lens(label, lens, ks, args)
            del lens, base
    print()
    print_table(rows, args.clock)
    print()
    print_targets(rows, args.clock)
    print(load())


if __name__ == "__main__":
    main()
