"""Throughput and latency side by side: lenscore in-process, a bare Serve app, lens-serve.

One run, one machine, one table (issue 11, item 6):

- in-process best rows/s: `lenscore.analyze` of a ~300-token text at the best batch size
  (swept on the first lens, every lens then measured at it), all cores; also the served
  workload in-process (~37-token requests one at a time, and `--clients` of them driven
  together by `lenscore.batch.run_together`);
- bare Serve: a FastAPI ingress deployment calling a replica deployment through a handle
  with a multiplexed model id, which answers a canned analysis of the same size;
- lens-serve with one client: p50 latency of a short greedy analysis, and the overhead
  beyond Serve = lens-serve p50 - in-process p50 - bare Serve p50; and again with the
  replica's own lenscore time (`meta.timings`) in place of the in-process one. The two
  differ when the same computation runs slower inside a Ray worker than in a quiet process
  (on 2 shared cores, Ray's own threads and the other Serve processes interrupt torch's);
  the second is the time the request path itself adds;
- served rows/s with `--clients` concurrent clients on 1, 2 and 4 lenses of the demo qwen2
  group (every request its own ~37-token text, lenses round-robin), with batching on
  (`--batch-max-rows`) and off (0), and on 4 lenses with 8 texts over and over (activation
  cache hits). Each run is divided by the in-process best for the same lens mix (harmonic
  mean of the lenses' rates: equal rows each), measured just before and after it.

The machine may be shared, so every rate is given twice: rows per wall second, and rows per
CPU-second (in-process: this process's CPU time; served: the CPU time of every process Ray
started, i.e. proxy, ingress, replica, controller, GCS and raylet; the clients are not
counted). The CPU ratio does not move with other load; the wall ratio does. The demo lenses
differ: qwen2-tiny-l1, -l2-first2 and -l1-donor share decoder prompt lengths (one pass),
qwen2-tiny-l0-single has its own, and the donor lens reads the donor's activations.

    python bench/throughput.py                      # demo tree built in a tmp dir
    python bench/throughput.py --demo .demo --seconds 10 --clients 8
    python bench/throughput.py --hidden 256 --layers 4   # a larger CPU base
    python bench/throughput.py --threads 1 --replica-cpus 1   # a busy shared machine

Ray gives an actor OMP_NUM_THREADS = its `num_cpus` (1 when fractional), i.e. its torch
threads; the replica's `num_cpus` defaults to the in-process threads so that both sides
compute with as many threads (with 1 against 2, a hidden-256 request takes 60% longer
served and that shows up as "overhead").

Then, unless `--no-preload`, bench/preload.py runs as a child process and prints its
table: parallel vs serial preload, predictive prefetch hit rate, packed vs trainer-file
disk switches (its docstring says how).

Targets (issue 11): overhead <= 3 ms beyond bare Serve; served rows/s >= 0.8x in-process
best for 1, 2 and 4 lenses.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lenscore import AnalysisOptions, analyze, load_base, load_lens  # noqa: E402
from lenscore.analyze import analysis_steps  # noqa: E402
from lenscore.batch import run_together  # noqa: E402
from lenscore.demo import DEMO_TEXT_PATH, make_demo  # noqa: E402

GROUP = "qwen2-tiny"
LENSES = ["qwen2-tiny-l1", "qwen2-tiny-l2-first2", "qwen2-tiny-l1-donor", "qwen2-tiny-l0-single"]
DONOR = "qwen2-tiny-donor"
TEXT_TOKENS = 36  # + BOS: the 37-token request
TEXT_STRIDE = 7  # windows overlap, but no two requests send the same text
TEXTS_PER_RUN = 280  # more than one served run sends on this machine
LONG_WINDOWS = 8  # the in-process text: 8 windows, ~300 tokens
BATCH_SIZES = (16, 32, 64, 128, 296)
TARGET_OVERHEAD_MS = 3.0
TARGET_RATIO = 0.8


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="demo tree (default: build one in a tmp dir)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of a built tree")
    parser.add_argument("--layers", type=int, default=3, help="layers of a built tree")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0, help="per served measurement")
    parser.add_argument("--latency-requests", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="in-process repeats (best of)")
    parser.add_argument("--batch-max-rows", type=int, default=256)
    parser.add_argument("--batch-max-wait-ms", type=float, default=2.0)
    parser.add_argument("--no-unbatched", action="store_true", help="skip batch_max_rows 0")
    parser.add_argument("--threads", type=int, help="in-process torch threads (default: all)")
    parser.add_argument(
        "--no-preload", action="store_true",
        help="skip the preloading rows (bench/preload.py, run at the end as a child process)",
    )  # fmt: skip
    parser.add_argument(
        "--replica-cpus",
        type=float,
        help="the group replica's num_cpus; Ray gives its torch that many threads (at least "
        "1). Default: the in-process threads, so both sides compute with the same threads",
    )
    return parser.parse_args()


def load() -> str:
    """The machine's 1/5/15-minute load averages."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"


def texts_of(tokenizer: Any, count: int) -> list[str]:
    """`count` different ~37-token texts: overlapping windows of the demo text."""
    ids = tokenizer(DEMO_TEXT_PATH.read_text(), add_special_tokens=False)["input_ids"]
    starts = range(0, len(ids) - TEXT_TOKENS, TEXT_STRIDE)
    return [tokenizer.decode(ids[s : s + TEXT_TOKENS]) for s in itertools.islice(starts, count)]


def body(text: str) -> dict[str, Any]:
    """A short greedy analysis with the default options (salience on)."""
    return {"text": text, "options": {"temperature": 0.0, "seed": 0}}


# -- in-process ---------------------------------------------------------------------------


def timed_analysis(lens: Any, text: str, batch_size: int) -> tuple[int, float, float]:
    """Rows, wall seconds and CPU seconds of one in-process analysis."""
    options = AnalysisOptions(temperature=0.0, seed=0, batch_size=batch_size)
    wall, cpu = time.perf_counter(), time.process_time()
    rows = len(analyze(lens, text=text, options=options)["rows"])
    return rows, time.perf_counter() - wall, time.process_time() - cpu


def best_rate(lens: Any, text: str, batch_size: int, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` rows/s (wall) and rows per CPU-second of one lens at one batch size."""
    best = {"wall": 0.0, "cpu": 0.0}
    for _ in range(repeats):
        rows, wall, cpu = timed_analysis(lens, text, batch_size)
        best = {"wall": max(best["wall"], rows / wall), "cpu": max(best["cpu"], rows / cpu)}
    return best


def long_text(texts: list[str]) -> str:
    """~300 tokens: windows that do not overlap, joined."""
    return " ".join(texts[:: TEXT_TOKENS // TEXT_STRIDE + 1][:LONG_WINDOWS])


def mix_rate(rates: dict[str, dict[str, float]], lens_ids: list[str], clock: str) -> float:
    """In-process rows/s of equal rows on each lens: the harmonic mean of their rates."""
    return len(lens_ids) / sum(1 / rates[lens_id][clock] for lens_id in lens_ids)


def reference(
    lenses: dict[str, Any], lens_ids: list[str], texts: list[str], batch: int
) -> dict[str, float]:
    """In-process best for a lens mix, measured now (best of one run before, one after)."""
    rates = {lens_id: best_rate(lenses[lens_id], long_text(texts), batch, 1)
             for lens_id in lens_ids}  # fmt: skip
    return {clock: mix_rate(rates, lens_ids, clock) for clock in ("wall", "cpu")}


def in_process(lenses: dict[str, Any], texts: list[str], args: argparse.Namespace) -> dict:
    """Best batch size; per lens: best rows/s, and rows/s of the served workload."""
    first = lenses[LENSES[0]]
    timed_analysis(first, texts[0], 32)  # warm-up
    sweep = {b: best_rate(first, long_text(texts), b, args.repeats) for b in BATCH_SIZES}
    batch = max(sweep, key=lambda b: sweep[b]["wall"])
    best = {lens_id: best_rate(lens, long_text(texts), batch, args.repeats)
            for lens_id, lens in lenses.items()}  # fmt: skip
    return {"batch": batch, "sweep": sweep, "best": best,
            "requests": request_rates(lenses, texts, args),
            "together": {count: together_rate(lenses, texts, count, args.clients)
                         for count in (1, 4)}}  # fmt: skip


def request_rates(
    lenses: dict[str, Any], texts: list[str], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Rows/s of the served workload in-process: ~37-token requests one at a time."""
    out = {}
    for lens_id, lens in lenses.items():
        runs = [timed_analysis(lens, t, 48) for t in texts[: args.latency_requests]]
        rows = sum(r for r, _, _ in runs)
        out[lens_id] = {"wall": rows / sum(w for _, w, _ in runs),
                        "cpu": rows / sum(c for _, _, c in runs)}  # fmt: skip
    return out


def together_rate(lenses: dict[str, Any], texts: list[str], count: int, clients: int) -> float:
    """Rows/s of `clients` requests at a time driven together in-process (no Serve)."""
    options = AnalysisOptions(temperature=0.0, seed=0)
    ids = LENSES[:count]
    started, rows = time.perf_counter(), 0
    for first in range(0, 4 * clients, clients):
        steps = [analysis_steps(lenses[ids[i % count]], text=texts[first + i], options=options)
                 for i in range(clients)]  # fmt: skip
        rows += sum(len(r["rows"]) for r in run_together(steps))
    return rows / (time.perf_counter() - started)


# Process roles by command line (Ray names actor processes `ray::<class>:<app>:<deployment>`).
ROLES = {
    "replica": f"ServeReplica:lens:{GROUP}",
    "ingress": "ServeReplica:lens:Ingress",
    "proxy": "ProxyActor",
    "bare": "ServeReplica:bare:",
}


def tree_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process's descendants (Ray), by role and in all."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - mine
        mine |= frontier
    out = dict.fromkeys([*ROLES, "other"], 0.0)
    for pid in mine:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            command = ""
        role = next((r for r, mark in ROLES.items() if mark in command), "other")
        out[role] += used[pid]
    out["all"] = sum(used[pid] for pid in mine)
    return out


# -- Serve --------------------------------------------------------------------------------


def free_port() -> int:
    """A free local TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_group(demo: Path, out: Path, args: argparse.Namespace) -> Path:
    """The demo qwen2 group, every lens resident, batching as asked."""
    manifest = json.loads((demo / "manifest.json").read_text())
    lenses = [{"id": lens_id, "name": lens_id, "layer": e["layer"], "donor": e["donor"],
               "checkpoint": str(demo / e["checkpoint"])}
              for lens_id, e in manifest["lenses"].items() if e["base"] == GROUP]  # fmt: skip
    data = {
        "group_id": GROUP,
        "name": GROUP,
        "base_model": str(demo / manifest["bases"][GROUP]),
        "replica": {
            "max_lenses_per_replica": len(lenses),
            "num_gpus": 0,
            "num_cpus": args.replica_cpus,
            "max_ongoing_requests": 4 * args.clients,
            "batch_max_rows": args.batch_max_rows,
            "batch_max_wait_ms": args.batch_max_wait_ms,
        },
        "donors": [{"id": DONOR, "path": str(demo / manifest["donors"][DONOR])}],
        "lenses": lenses,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{GROUP}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def bare_app(canned: dict[str, Any]) -> Any:
    """A Serve app of lens-serve's shape that does no lens work: ingress -> handle -> replica."""
    from fastapi import Body, FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64)
    class BareReplica:
        def __init__(self, answer: dict[str, Any]) -> None:
            self.answer = answer

        async def analyze(self, body: dict[str, Any]) -> dict[str, Any]:
            return self.answer

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=200)
    @serve.ingress(app)
    class BareIngress:
        def __init__(self, replica: Any) -> None:
            self.replica = replica

        @app.post("/api/v2/lenses/{lens_id}/analyze")
        async def analyze(self, lens_id: str, body: dict = Body(...)) -> dict:  # noqa: B008
            handle = self.replica.options(multiplexed_model_id=lens_id)
            return await handle.analyze.remote(body)

    return BareIngress.bind(BareReplica.bind(canned))


def start_serve(port: int) -> None:
    """Ray with logical CPUs and Serve on `port`; workers import this repository."""
    import ray
    from ray import serve

    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def latency_p50_ms(url: str, lens_id: str, texts: list[str]) -> float:
    """One client, one request at a time: the median latency in ms."""
    with httpx.Client(timeout=120) as client:
        return 1000 * statistics.median(timed_post(client, url, lens_id, t) for t in texts)


def timed_post(client: httpx.Client, url: str, lens_id: str, text: str) -> float:
    """Seconds of one analysis request."""
    return timed_post_meta(client, url, lens_id, text)[0]


def timed_post_meta(
    client: httpx.Client, url: str, lens_id: str, text: str
) -> tuple[float, float | None]:
    """Seconds of one analysis request, and the compute seconds its `meta.timings` report."""
    started = time.perf_counter()
    response = client.post(f"{url}/api/v2/lenses/{lens_id}/analyze", json=body(text))
    seconds = time.perf_counter() - started
    response.raise_for_status()
    timings = response.json()["meta"].get("timings") or {}
    return seconds, timings.get("total_seconds")


def interleaved_p50_ms(url: str, lens: Any, texts: list[str]) -> dict[str, float]:
    """p50 ms of in-process, bare Serve and lens-serve, one request of each in turn.

    Taking them in turn exposes all three to the same machine load. `lens_compute` is the
    lenscore time the replica reports in `meta.timings` (bare Serve has none to report).
    """
    seconds: dict[str, list[float]] = {"in_process": [], "bare": [], "lens": [],
                                       "lens_compute": []}  # fmt: skip
    with httpx.Client(timeout=120) as client:
        for text in texts:
            seconds["in_process"].append(timed_analysis(lens, text, 48)[1])
            seconds["bare"].append(timed_post(client, f"{url}/bare", lens.lens_id, text))
            total, compute = timed_post_meta(client, f"{url}/lens", lens.lens_id, text)
            seconds["lens"].append(total)
            seconds["lens_compute"].append(compute if compute is not None else float("nan"))
    return {name: 1000 * statistics.median(values) for name, values in seconds.items()}


async def served_rate(
    url: str, lens_ids: list[str], texts: list[str], clients: int, seconds: float
) -> dict[str, float]:
    """Rows/s and rows per CPU-second of Ray's processes: `clients` clients for `seconds`.

    Lenses go round-robin; request i sends `texts[i % len(texts)]`.
    """
    counter = itertools.count()
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> tuple[int, int]:
        rows = requests = 0
        while time.perf_counter() < deadline:
            i = next(counter)
            lens_id = lens_ids[i % len(lens_ids)]
            data = body(texts[i % len(texts)])
            response = await http.post(f"{url}/api/v2/lenses/{lens_id}/analyze", json=data)
            response.raise_for_status()
            rows += len(response.json()["rows"])
            requests += 1
        return rows, requests

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        cpu, started = tree_cpu_seconds(), time.perf_counter()
        done = await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed, after = time.perf_counter() - started, tree_cpu_seconds()
    rows, requests = sum(r for r, _ in done), sum(n for _, n in done)
    per_request_ms = {role: round(1000 * (after[role] - cpu[role]) / requests, 1)
                      for role in after}  # fmt: skip
    return {"wall": rows / elapsed, "cpu": rows / (after["all"] - cpu["all"]),
            "requests": requests, "cpu_ms_per_request": per_request_ms}  # fmt: skip


def replica_batching(app: str) -> dict[str, Any]:
    """The replica's batching and activation cache counters."""
    from ray import serve

    status = serve.get_deployment_handle(GROUP, app_name=app).status.remote().result()
    return {"batching": status.batching.model_dump(),
            "cache": status.activation_cache.model_dump()}  # fmt: skip


def reconfigure(app: str, user_config: dict[str, Any]) -> None:
    """Apply a `user_config` to the group replica directly (as `serve deploy` would)."""
    from ray import serve

    handle = serve.get_deployment_handle(GROUP, app_name=app)
    handle.reconfigure.remote(user_config).result(timeout_s=60)


# (mode, lenses, repeated texts): batched on 1, 2, 4 lenses; 4 lenses on 8 texts over and
# over (activation cache hits); then the same with batching off.
RUNS = [(1, False), (2, False), (4, False), (4, True)]


def served(
    demo: Path, lenses: dict[str, Any], texts: list[str], batch: int, args: argparse.Namespace
) -> dict:
    """Bare Serve and lens-serve latencies, then served rows/s per lens mix and mode.

    Each served run sits between two in-process measurements of the same lens mix (at the
    best batch size); its reference is the better of the two.
    """
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    start_serve(port)
    url = f"http://127.0.0.1:{port}"
    canned = analyze(lenses[LENSES[0]], text=texts[0], options=AnalysisOptions(temperature=0))
    serve.run(bare_app(canned), name="bare", route_prefix="/bare")
    groups = write_group(demo, Path(tempfile.mkdtemp(prefix="lens-throughput-")), args)
    serve.run(build_app({"groups_dir": str(groups)}), name="lens", route_prefix="/lens")
    for lens_id in LENSES:
        latency_p50_ms(f"{url}/lens", lens_id, texts[:2])  # warm-up: every lens resident
    latency_p50_ms(f"{url}/bare", LENSES[0], texts[:5])
    probe = texts[-args.latency_requests :]
    out: dict[str, Any] = {
        "p50_ms": interleaved_p50_ms(url, lenses[LENSES[0]], probe),
        "bare_rate": asyncio.run(
            served_rate(f"{url}/bare", LENSES[:1], texts, args.clients, args.seconds)
        ),
        "rates": {},
    }
    modes = [("batched", args.batch_max_rows)] + ([] if args.no_unbatched else [("alone", 0)])
    offsets = itertools.count(10, TEXTS_PER_RUN)  # fresh texts per run: no cache hits
    for mode, rows in modes:
        reconfigure("lens", {"batch_max_rows": rows})
        for count, repeated in RUNS:
            ids = LENSES[:count]
            start = next(offsets)
            run_texts = texts[start : start + (8 if repeated else TEXTS_PER_RUN)]
            before = reference(lenses, ids, texts, batch)
            rate = asyncio.run(
                served_rate(f"{url}/lens", ids, run_texts, args.clients, args.seconds)
            )
            after = reference(lenses, ids, texts, batch)
            ref = {c: max(before[c], after[c]) for c in ("wall", "cpu")}
            out["rates"][(mode, count, repeated)] = (rate, ref)
            print(f"  served {mode:<7} {count} lens(es){' 8 texts' if repeated else ''}: "
                  f"{rate['wall']:.0f} rows/s (in-process {ref['wall']:.0f}), "
                  f"{rate['cpu']:.0f} rows/cpu-s (in-process {ref['cpu']:.0f}), "
                  f"{rate['requests']} requests, CPU ms per request "
                  f"{rate['cpu_ms_per_request']}, {load()}", flush=True)  # fmt: skip
        out[f"status_{mode}"] = replica_batching("lens")
    serve.shutdown()
    return out


# -- table --------------------------------------------------------------------------------


def overhead_verdict(overhead_ms: float) -> str:
    return "ok" if overhead_ms <= TARGET_OVERHEAD_MS else "MISS"


def print_table(inproc: dict, serve_out: dict, args: argparse.Namespace) -> None:
    """Markdown: in-process rows, latency rows, then served rows/s against in-process."""
    best, requests = inproc["best"], inproc["requests"]
    p50 = serve_out["p50_ms"]
    overhead = p50["lens"] - p50["in_process"] - p50["bare"]
    ours = p50["lens"] - p50["lens_compute"] - p50["bare"]
    print(f"\n{load()}; in-process best batch size {inproc['batch']}")
    print("| measure | rows/s (wall) | rows per CPU-second | target |")
    print("|---|---:|---:|---|")
    for lens_id in LENSES:
        r, q = best[lens_id], requests[lens_id]
        print(f"| in-process, {lens_id}: ~300 tokens at batch {inproc['batch']} / ~37-token "
              f"requests one at a time | {r['wall']:.0f} / {q['wall']:.0f} "
              f"| {r['cpu']:.0f} / {q['cpu']:.0f} | |")  # fmt: skip
    for count, rate in inproc["together"].items():
        print(f"| in-process, {args.clients} requests driven together, {count} lens(es) "
              f"| {rate:.0f} | | |")  # fmt: skip
    bare = serve_out["bare_rate"]
    print(f"| bare Serve, {args.clients} clients (rows/s had each answer ~37 real rows) "
          f"| {bare['wall']:.0f} | {bare['cpu']:.0f} | |")  # fmt: skip
    print(f"\nCPU ms per request by process: bare Serve {bare['cpu_ms_per_request']}")
    for (mode, count, repeated), (rate, _) in serve_out["rates"].items():
        what = f"{mode}, {count} lens(es){', 8 texts' if repeated else ''}"
        print(f"CPU ms per request by process: lens-serve {what}: {rate['cpu_ms_per_request']}")
    print("\n| measure | rows/s (wall) | rows per CPU-second | target |\n|---|---:|---:|---|")
    for (mode, count, repeated), (rate, ref) in serve_out["rates"].items():
        what = f"served, {args.clients} clients, {count} lens(es)"
        what += ", 8 texts over and over" if repeated else ""
        what += f", batch_max_rows {args.batch_max_rows if mode == 'batched' else 0}"
        wall, cpu = rate["wall"] / ref["wall"], rate["cpu"] / ref["cpu"]
        target = ""
        if mode == "batched" and not repeated:
            verdict = "ok" if max(wall, cpu) >= TARGET_RATIO else "MISS"
            target = f">= {TARGET_RATIO}x {verdict}"
        print(f"| {what} | {rate['wall']:.0f} = {wall:.2f}x of {ref['wall']:.0f} "
              f"| {rate['cpu']:.0f} = {cpu:.2f}x of {ref['cpu']:.0f} | {target} |")  # fmt: skip
    print("\n| latency, one client | p50 ms | | target |\n|---|---:|---:|---|")
    print(f"| in-process `lenscore.analyze` | {p50['in_process']:.1f} | | |")
    print(f"| bare Serve | {p50['bare']:.1f} | | |")
    print(f"| lens-serve | {p50['lens']:.1f} | | |")
    print(f"| lens-serve: the replica's lenscore time (`meta.timings.total_seconds`) "
          f"| {p50['lens_compute']:.1f} | | |")  # fmt: skip
    print(f"| overhead beyond Serve: lens-serve - in-process - bare Serve | {overhead:.1f} "
          f"| | <= {TARGET_OVERHEAD_MS} ms {overhead_verdict(overhead)} |")  # fmt: skip
    print(f"| overhead beyond Serve: lens-serve - the replica's lenscore time - bare Serve "
          f"| {ours:.1f} | | <= {TARGET_OVERHEAD_MS} ms {overhead_verdict(ours)} |")  # fmt: skip
    for mode in ("batched", "alone"):
        if f"status_{mode}" in serve_out:
            print(f"replica counters after the {mode} runs: {serve_out[f'status_{mode}']}")


def main() -> None:
    """Build or read the demo tree, measure in-process, then under Serve; print the table."""
    args = parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.replica_cpus is None:
        args.replica_cpus = float(torch.get_num_threads())
    print(f"in-process torch threads {torch.get_num_threads()}; replica num_cpus "
          f"{args.replica_cpus} (Ray sets its OMP_NUM_THREADS, so its torch threads)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lens-throughput-") as scratch:
        demo = args.demo or Path(scratch) / "demo"
        if not (demo / "manifest.json").is_file():
            make_demo(demo, hidden_size=args.hidden, n_layers=args.layers)
        manifest = json.loads((demo / "manifest.json").read_text())
        base = load_base(demo / manifest["bases"][GROUP])
        donor = load_base(demo / manifest["donors"][DONOR])
        lenses = {lens_id: load_lens(demo / "lenses" / lens_id, base, lens_id=lens_id,
                                     donor=donor if lens_id.endswith("donor") else None)
                  for lens_id in LENSES}  # fmt: skip
        texts = texts_of(base.tokenizer, 2400)
        print(f"{load()}; {len(texts)} texts of ~{TEXT_TOKENS + 1} tokens", flush=True)
        inproc = in_process(lenses, texts, args)
        sweep = {b: round(r["wall"]) for b, r in inproc["sweep"].items()}
        print(f"  in-process sweep (rows/s wall): {sweep}", flush=True)
        serve_out = served(demo, lenses, texts, inproc["batch"], args)
        print_table(inproc, serve_out, args)
    if not args.no_preload:
        # Its own process: its hidden-1024 lenses need memory this one no longer holds.
        print("\npreloading (bench/preload.py):", flush=True)
        subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "preload.py")], check=True)


if __name__ == "__main__":
    main()
