"""Bounded load against a running lens-serve: mixed lenses across groups, Zipf popularity.

N clients send analyses for S seconds (or until `--max-requests`), each picking a lens with
Zipf(s) popularity over every lens of every group and a text from a small built-in list;
a `--greedy-fraction` of them at temperature 0, the rest sampled with a seed. Before the load,
one single request per (lens, text) at temperature 0 gives the reference answers.

Prints throughput, latency percentiles, status code counts, switches by kind (from the
responses, and from the group status before and after) and a last line
`N passed, N failed` over the invariants (issue 5): no 5xx other than 503, every greedy answer
equal to the single-request answer, every request answered with an HTTP status.

    python bench/load.py [--url http://127.0.0.1:8000] [--clients 8] [--seconds 20]
                         [--zipf 1.1] [--api-key KEY] [--max-requests 5000]

Only loopback targets: this is a bench for a server you started, not a flood tool.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b",
    "She opened the letter, read it twice, and began to laugh.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
MAX_CLIENTS = 256
MAX_SECONDS = 3600.0
SWITCH_KINDS = ("hit", "host", "disk", "first")
# Greedy rows must match exactly in tokens and text; floats may differ by thread scheduling.
FLOAT_REL_TOLERANCE = 1e-4


@dataclass
class Tally:
    """What the clients saw."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    switch_kinds: collections.Counter = field(default_factory=collections.Counter)
    transport_errors: collections.Counter = field(default_factory=collections.Counter)
    greedy_checked: int = 0
    greedy_mismatches: list[str] = field(default_factory=list)
    sent: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and bound the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="loopback base URL")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s (> 0)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--greedy-fraction", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    host = urlsplit(args.url).hostname or ""
    if host not in LOOPBACK_HOSTS:
        parser.error(f"--url must be a loopback address, not {host!r}")
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be within 1..{MAX_CLIENTS}")
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be within (0, {MAX_SECONDS}]")
    if args.zipf <= 0 or args.max_requests < 1 or not 0 <= args.greedy_fraction <= 1:
        parser.error("--zipf must be > 0, --max-requests >= 1, --greedy-fraction in 0..1")
    return args


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of ranks 1..n: 1 / rank**s (random.choices normalises)."""
    return [1.0 / (rank**s) for rank in range(1, n + 1)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def is_same_answer(mine: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Greedy rows equal: tokens and explanations exactly, numbers within a tolerance."""
    rows, ref_rows = mine.get("rows", []), reference.get("rows", [])
    if len(rows) != len(ref_rows):
        return False
    return all(_is_same_value(a, b) for a, b in zip(rows, ref_rows, strict=True))


def _is_same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        return math.isclose(a, b, rel_tol=FLOAT_REL_TOLERANCE, abs_tol=1e-7)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_is_same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_is_same_value(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def analyze_body(text: str, temperature: float, seed: int) -> dict[str, Any]:
    """The analyze request body."""
    return {"text": text, "options": {"temperature": temperature, "seed": seed}}


async def switch_totals(client: httpx.AsyncClient, group_ids: list[str]) -> dict[str, int]:
    """Switch counts by kind summed over every replica of every group (group status)."""
    totals = dict.fromkeys(SWITCH_KINDS, 0)
    for group_id in group_ids:
        resp = await client.get(f"/api/v2/groups/{group_id}/status")
        resp.raise_for_status()
        for replica in resp.json()["replicas"]:
            for kind, count in replica.get("switches", {}).items():
                totals[kind] = totals.get(kind, 0) + count
    return totals


async def references(
    client: httpx.AsyncClient, lens_ids: list[str]
) -> dict[tuple[str, str], dict[str, Any]]:
    """One single greedy request per (lens, text), one at a time."""
    found = {}
    for lens_id in lens_ids:
        for text in TEXTS:
            resp = await client.post(
                f"/api/v2/lenses/{lens_id}/analyze", json=analyze_body(text, 0.0, 0)
            )
            if resp.status_code != 200:
                raise SystemExit(f"reference for {lens_id}: {resp.status_code} {resp.text[:300]}")
            found[(lens_id, text)] = resp.json()
    return found


async def one_client(
    client: httpx.AsyncClient,
    plan: dict[str, Any],
    refs: dict[tuple[str, str], dict[str, Any]],
    tally: Tally,
    rng: random.Random,
) -> None:
    """Send requests until the deadline or the request budget runs out."""
    lens_ids, weights = plan["lens_ids"], plan["weights"]
    while time.monotonic() < plan["deadline"] and tally.sent < plan["max_requests"]:
        tally.sent += 1
        lens_id = rng.choices(lens_ids, weights)[0]
        text = rng.choice(TEXTS)
        is_greedy = rng.random() < plan["greedy_fraction"]
        body = analyze_body(
            text, 0.0 if is_greedy else 1.0, 0 if is_greedy else rng.randrange(1 << 30)
        )
        started = time.perf_counter()
        try:
            resp = await client.post(f"/api/v2/lenses/{lens_id}/analyze", json=body)
        except httpx.HTTPError as exc:
            tally.transport_errors[type(exc).__name__] += 1
            continue
        tally.latencies_s.append(time.perf_counter() - started)
        tally.statuses[resp.status_code] += 1
        if resp.status_code != 200:
            continue
        result = resp.json()
        tally.switch_kinds[result["meta"].get("switch", {}).get("kind", "?")] += 1
        if is_greedy:
            tally.greedy_checked += 1
            if not is_same_answer(result, refs[(lens_id, text)]):
                tally.greedy_mismatches.append(f"{lens_id} {text[:30]!r}")


def invariants(tally: Tally) -> list[tuple[str, bool, str]]:
    """(name, held, detail) for each invariant of issue 5."""
    bad_5xx = {s: n for s, n in tally.statuses.items() if s >= 500 and s != 503}
    answered = sum(tally.statuses.values())
    return [
        ("no 5xx other than 503", not bad_5xx, str(bad_5xx or "none")),
        (
            "greedy answers equal the single-request answers",
            not tally.greedy_mismatches,
            f"{tally.greedy_checked} checked, {len(tally.greedy_mismatches)} differ "
            f"{tally.greedy_mismatches[:5]}",
        ),
        (
            "every request got an HTTP answer",
            not tally.transport_errors,
            str(dict(tally.transport_errors) or "none"),
        ),
        ("some requests succeeded", tally.statuses.get(200, 0) > 0, f"{answered} answered"),
    ]


def report(tally: Tally, elapsed_s: float, before: dict[str, int], after: dict[str, int]) -> int:
    """Print the table and the invariants; return the number of failed invariants."""
    answered = sum(tally.statuses.values())
    print(f"{'requests answered':<34}{answered}")
    print(f"{'wall seconds':<34}{elapsed_s:.1f}")
    print(f"{'throughput (req/s)':<34}{answered / elapsed_s:.2f}")
    if tally.latencies_s:
        for q in (50, 95, 99):
            print(f"{f'latency p{q} (ms)':<34}{percentile(tally.latencies_s, q) * 1000:.1f}")
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items()))
    print(f"{'status codes':<34}{statuses}")
    kinds = ", ".join(f"{k}: {tally.switch_kinds.get(k, 0)}" for k in SWITCH_KINDS)
    print(f"{'switches (responses)':<34}{kinds}")
    delta = ", ".join(f"{k}: {after.get(k, 0) - before.get(k, 0)}" for k in SWITCH_KINDS)
    # Replicas push status on every load and eviction but hits only on their health check
    # (about 10 s), so this delta can lag the responses' own count.
    print(f"{'switches (group status delta)':<34}{delta}")
    failed = 0
    for name, held, detail in invariants(tally):
        failed += not held
        print(f"{'PASS' if held else 'FAIL'}  {name}: {detail}")
    checks = len(invariants(tally))
    print(f"{checks - failed} passed, {failed} failed")
    return failed


async def run(args: argparse.Namespace) -> int:
    """Fetch lenses and references, run the clients, print the report."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 2)
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, timeout=args.timeout, limits=limits
    ) as client:
        lenses = (await client.get("/api/v2/lenses")).raise_for_status().json()["lenses"]
        rng = random.Random(args.seed)
        lens_ids = [lens["lens_id"] for lens in lenses]
        rng.shuffle(lens_ids)  # popularity rank independent of the config order
        group_ids = sorted({lens["group_id"] for lens in lenses})
        print(f"{len(lens_ids)} lenses in {len(group_ids)} groups; Zipf s={args.zipf}")
        refs = await references(client, lens_ids)
        before = await switch_totals(client, group_ids)
        tally = Tally()
        plan = {
            "lens_ids": lens_ids,
            "weights": zipf_weights(len(lens_ids), args.zipf),
            "greedy_fraction": args.greedy_fraction,
            "max_requests": args.max_requests,
            "deadline": time.monotonic() + args.seconds,
        }
        started = time.monotonic()
        await asyncio.gather(
            *(
                one_client(client, plan, refs, tally, random.Random(args.seed + 1 + i))
                for i in range(args.clients)
            )
        )
        elapsed_s = time.monotonic() - started
        after = await switch_totals(client, group_ids)
    return report(tally, elapsed_s, before, after)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; exit status 1 when an invariant failed."""
    return 1 if asyncio.run(run(parse_args(argv))) else 0


if __name__ == "__main__":
    sys.exit(main())
