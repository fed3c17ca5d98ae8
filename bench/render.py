"""Time-to-render and scrolling of a large analysis in the web page, in headless Chromium.

Serves `frontend/` from a small local HTTP server (no Ray: the page only needs its static
files, and `GET /api/v2/groups` answers an empty list), imports a synthetic analysis of N
tokens (8 explanation words each, salience, KL, 5 logit-lens tokens) through the page's
import input, and measures:

- render: the page's own time from having the rows to the last row in the document
  (`data-render-ms`), for the table, transposed and full-text views;
- import-to-rows: wall time from choosing the file to every row in the document;
- import-to-painted: the same, up to the first frame after the last row (what a user sees);
- longest task: the longest main-thread task during the table render (PerformanceObserver);
- scroll: frame times while scrolling the table down 400 px a frame (a fast flick, 24,000
  px/s at 60 Hz) for 60 frames; 16.7 ms is a perfect frame.

    python bench/render.py [--rows 2000] [--repeats 5] [--chromium /usr/bin/chromium]

Target (issue 10 §6): render <= 1 s for 2,000 rows; STYLE §9: no task > 100 ms.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import random
import shutil
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
FRONTEND = REPO_ROOT / "frontend"
WORDS = ["cat", " sat", " on", " the", " mat", " because", " warm", "ly", " dog", " ran", "?", "!"]


def synthetic_jsonl(n_rows: int, seed: int = 0) -> str:
    """An exported analysis of `n_rows` tokens, as the page writes it."""
    rng = random.Random(seed)
    ids = {"lens_id": "bench-lens", "group_id": "bench"}
    request = {"text": "x" * n_rows, "options": {"seed": 1}}
    meta = {**ids, "layer": 1, "t_text": 8, "n_tokens": n_rows, "options": {"seed": 1}}
    lines = [
        {"event": "request", "format": "lens-serve/analysis-v1", "title": "bench", **ids,
         "request": request},
        {"event": "meta", "meta": meta},
    ]  # fmt: skip
    for position in range(n_rows):
        words = [rng.choice(WORDS) for _ in range(8)]
        lines.append({"event": "row", "row": {
            "position": position, "token": rng.choice(WORDS), "token_id": position % 500,
            "explanation": "".join(words), "explanation_tokens": words,
            "explanation_token_ids": list(range(8)), "mse": rng.uniform(10, 100),
            "relative_rmse": rng.uniform(0.5, 2), "kl": rng.uniform(0, 3),
            "token_salience": [rng.uniform(-0.2, 0.6) for _ in words],
            "logit_lens_top": [{"token": rng.choice(WORDS), "token_id": i, "logit": 20 - i}
                               for i in range(5)],
        }})  # fmt: skip
    return "\n".join(json.dumps(line) for line in lines) + "\n"


class Handler(http.server.SimpleHTTPRequestHandler):
    """`/` is the page, `/static/*` its files, `/api/v2/groups` an empty list."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(FRONTEND), **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0]
        if path.startswith("/api/v2/groups"):
            body = json.dumps({"groups": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if path == "/":
            self.path = "/index.html"
        elif path.startswith("/static/"):
            self.path = path[len("/static") :]
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


def serve_frontend() -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


WATCH_LONG_TASKS = """() => {
  window.__longest = 0;
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) {
      window.__longest = Math.max(window.__longest, entry.duration);
    }
  }).observe({ type: "longtask", buffered: false });
}"""

NEXT_FRAME = """() => new Promise(
  (resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)))"""

SCROLL = """async ([steps, px]) => {
  const box = document.querySelector(".analysis-body");
  const frames = [];
  let last = performance.now();
  for (let i = 1; i <= steps; i += 1) {
    box.scrollTop += px;
    await new Promise((resolve) => requestAnimationFrame(() => {
      const now = performance.now();
      frames.push(now - last);
      last = now;
      resolve();
    }));
  }
  return frames;
}"""


def one_run(page: Any, url: str, jsonl_path: Path, n_rows: int) -> dict[str, float]:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    page.evaluate("localStorage.clear()")
    page.evaluate(WATCH_LONG_TASKS)
    started = page.evaluate("performance.now()")
    page.get_by_test_id("import-input").set_input_files(str(jsonl_path))
    page.wait_for_selector('[data-testid="result-table"][data-rendered="true"]', timeout=60_000)
    finished = page.evaluate("performance.now()")
    page.evaluate(NEXT_FRAME)
    painted = page.evaluate("performance.now()")
    assert page.get_by_test_id("result-row").count() == n_rows
    table_ms = float(page.get_attribute(".analysis-body", "data-render-ms"))
    longest = page.evaluate("window.__longest")
    frames = page.evaluate(SCROLL, [60, 400])
    page.get_by_test_id("view-transposed").click()
    page.wait_for_selector('[data-testid="transposed-view"][data-rendered="true"]', timeout=60_000)
    transposed_ms = float(page.get_attribute(".analysis-body", "data-render-ms"))
    page.get_by_test_id("view-fulltext").click()
    page.wait_for_selector('[data-testid="fulltext-view"][data-rendered="true"]', timeout=60_000)
    fulltext_ms = float(page.get_attribute(".analysis-body", "data-render-ms"))
    frames.sort()
    return {
        "table_ms": table_ms,
        "import_to_rows_ms": finished - started,
        "import_to_painted_ms": painted - started,
        "longest_task_ms": longest,
        "scroll_p95_frame_ms": frames[int(0.95 * (len(frames) - 1))],
        "scroll_max_frame_ms": frames[-1],
        "transposed_ms": transposed_ms,
        "fulltext_ms": fulltext_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--chromium", default=os.environ.get("LENS_SERVE_CHROMIUM") or shutil.which("chromium")
    )
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    server, url = serve_frontend()
    runs = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        jsonl_path = Path(tmp) / "bench.jsonl"
        jsonl_path.write_text(synthetic_jsonl(args.rows))
        launch_args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        browser = pw.chromium.launch(executable_path=args.chromium, args=launch_args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        one_run(page, url, jsonl_path, args.rows)  # warm-up: module loading and JIT
        for _ in range(args.repeats):
            runs.append(one_run(page, url, jsonl_path, args.rows))
        version = browser.version
        browser.close()
    server.shutdown()
    print(
        f"{args.rows} rows, {args.repeats} runs, headless Chromium {version}, {os.cpu_count()} CPUs"
    )
    print(f"{'metric':<22}{'median':>10}{'max':>10}")
    for key in runs[0]:
        values = [run[key] for run in runs]
        print(f"{key:<22}{statistics.median(values):>10.1f}{max(values):>10.1f}")


if __name__ == "__main__":
    main()
