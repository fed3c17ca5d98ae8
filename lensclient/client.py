"""`LensClient`: the lens-serve v2 API from Python, results as pandas DataFrames.

httpx + pandas only (no torch): `pip install "lens-serve[client]"`. Every failure raises a
typed `LensAPIError` carrying the API's error code (`lensclient.errors`).

    client = LensClient("http://localhost:8000", api_key="...")
    df = client.analyze("qwen2-tiny-l1", text="The cat sat.", temperature=0, seed=1)
    job = client.submit("analyze", "qwen2-tiny-l1", text="A long text ...", best_of_k=8)
    df = job.result()
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import httpx
import pandas as pd

from lensclient.errors import JobFailed, job_error, raise_for
from lensclient.frames import analysis_frame, many_frame

DEFAULT_TIMEOUT_S = 300.0
ACTIVE = ("queued", "running")


def analyze_body(
    text: str | None, messages: list[dict[str, str]] | None, options: dict[str, Any]
) -> dict[str, Any]:
    """Return the body of an analysis: exactly one of `text` / `messages`, and `options`."""
    body: dict[str, Any] = {"options": options}
    if text is not None:
        body["text"] = text
    if messages is not None:
        body["messages"] = messages
    return body


def job_body(
    kind: str,
    lens_id: str,
    text: str | None,
    messages: list[dict[str, str]] | None,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """Return the body of `POST /api/v2/jobs`; an analyze job's extra fields are its options."""
    if kind == "analyze":
        options = {**fields.pop("options", {}), **fields}
        return {"kind": kind, "lens_id": lens_id, **analyze_body(text, messages, options)}
    body = {"kind": kind, "lens_id": lens_id, **fields}
    if text is not None:
        body["text"] = text
    if messages is not None:
        body["messages"] = messages
    return body


def inputs_of(
    lens_ids: str | Sequence[str],
    texts: str | Sequence[str] | None,
    messages: Sequence[list[dict[str, str]]] | None,
) -> list[tuple[str, int, str | None, list[dict[str, str]] | None]]:
    """Every (lens, input index, text, messages) pair of an `analyze_many` call."""
    lenses = [lens_ids] if isinstance(lens_ids, str) else list(lens_ids)
    if (texts is None) == (messages is None):
        raise ValueError("give texts or messages (a list of chats), not both")
    if texts is not None:
        items = [texts] if isinstance(texts, str) else list(texts)
        inputs = [(text, None) for text in items]
    else:
        inputs = [(None, chat) for chat in messages or []]
    return [(lens, i, t, m) for lens in lenses for i, (t, m) in enumerate(inputs)]


def progress_bar(total: int, enabled: bool, what: str) -> Any:
    """Return a tqdm bar when tqdm is installed and `enabled`, else a silent stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=what)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        """Ignore an update."""

    def close(self) -> None:
        """Nothing to close."""


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parse server-sent events into (event, data) pairs; comments are skipped."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


class LensClient:
    """A client of one lens-serve server (thread-safe: one connection pool)."""

    def __init__(
        self,
        url: str = "http://localhost:8000",
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> LensClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the API; return the decoded JSON or raise its typed error."""
        response = self.http.request(method, path, **kwargs)
        raise_for(response)
        return response.json()

    # -- catalog ----------------------------------------------------------------------------

    def groups(self) -> list[dict[str, Any]]:
        """Return groups with their lenses, sizes, residency and switch estimates."""
        return self.request("GET", "/api/v2/groups")["groups"]

    def lenses(self) -> pd.DataFrame:
        """Every lens, one row each: id, group, name, layer, t_text, donor, bytes, residency."""
        lenses = self.request("GET", "/api/v2/lenses")["lenses"]
        return pd.DataFrame.from_records(lenses)

    def lens(self, lens_id: str) -> dict[str, Any]:
        """One lens's details."""
        return self.request("GET", f"/api/v2/lenses/{lens_id}")

    # -- lens calls -------------------------------------------------------------------------

    def analyze(
        self,
        lens_id: str,
        text: str | None = None,
        messages: list[dict[str, str]] | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Analyse a text or chat with one lens: one DataFrame row per token.

        `options` are the analysis options (temperature, seed, best_of_k, kl, logit_lens,
        ...); `df.attrs["request"]` and `df.attrs["meta"]` keep what was asked and answered.
        """
        body = analyze_body(text, messages, options)
        result = self.request("POST", f"/api/v2/lenses/{lens_id}/analyze", json=body)
        return analysis_frame(result, {"lens_id": lens_id, **body})

    def analyze_many(
        self,
        lens_ids: str | Sequence[str],
        texts: str | Sequence[str] | None = None,
        messages: Sequence[list[dict[str, str]]] | None = None,
        *,
        concurrency: int = 4,
        progress: bool = True,
        **options: Any,
    ) -> pd.DataFrame:
        """Analyse every input with every lens, `concurrency` at a time, with a progress bar.

        Returns one DataFrame: each row also has `lens_id` and `input` (the input's index);
        `attrs["meta"]` lists each analysis's meta in the same order.
        """
        items = inputs_of(lens_ids, texts, messages)
        bar = progress_bar(len(items), progress, "analyze")
        parts: dict[int, tuple[dict[str, Any], pd.DataFrame]] = {}
        try:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                futures = {
                    pool.submit(self.analyze, lens, text, chat, **options): n
                    for n, (lens, _, text, chat) in enumerate(items)
                }
                for future in as_completed(futures):
                    n = futures[future]
                    parts[n] = ({"lens_id": items[n][0], "input": items[n][1]}, future.result())
                    bar.update(1)
        finally:
            bar.close()
        return many_frame([parts[n] for n in sorted(parts)])

    def generate(
        self,
        lens_id: str,
        text: str | None = None,
        messages: list[dict[str, str]] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Continuations from the lens's activation model (`max_new_tokens`, `temperature`, ...)."""
        body = job_body("generate", lens_id, text, messages, fields)
        del body["kind"], body["lens_id"]
        return self.request("POST", f"/api/v2/lenses/{lens_id}/generate", json=body)

    def send_message(
        self, lens_id: str, messages: list[dict[str, str]], **fields: Any
    ) -> dict[str, Any]:
        """One assistant reply (`response`), ending at the end-of-turn marker."""
        body = {"messages": messages, **fields}
        return self.request("POST", f"/api/v2/lenses/{lens_id}/send_message", json=body)

    # -- jobs -------------------------------------------------------------------------------

    def submit(
        self,
        kind: str,
        lens_id: str,
        text: str | None = None,
        messages: list[dict[str, str]] | None = None,
        **fields: Any,
    ) -> Job:
        """Submit a durable job (`analyze`, `generate` or `send_message`); return its handle.

        For `analyze`, extra keywords are analysis options.
        """
        body = job_body(kind, lens_id, text, messages, fields)
        view = self.request("POST", "/api/v2/jobs", json=body)
        return Job(self, view, body)

    def job(self, job_id: str) -> Job:
        """Return a handle on an existing job (for instance one submitted by an earlier session)."""
        view = self.request("GET", f"/api/v2/jobs/{job_id}")
        return Job(self, view, view.get("request") or {})


class Job:
    """A submitted job: poll it, wait for its result, stream its events, cancel it."""

    def __init__(self, client: LensClient, view: dict[str, Any], request: dict[str, Any]) -> None:
        self.client = client
        self.view = view
        self.request = request
        self.id: str = view["job_id"]
        self.kind: str = view["kind"]

    def __repr__(self) -> str:
        return f"Job({self.id!r}, kind={self.kind!r}, status={self.view.get('status')!r})"

    def status(self) -> dict[str, Any]:
        """Refresh and return the job's view (status, progress, timings, result, error)."""
        self.view = self.client.request("GET", f"/api/v2/jobs/{self.id}")
        return self.view

    def wait(self, timeout: float | None = None, poll_interval: float = 0.5) -> dict[str, Any]:
        """Poll until the job ends; return its final view.

        Raises:
            TimeoutError: it did not end within `timeout` seconds.

        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.status()["status"] in ACTIVE:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {self.view['status']} after {timeout}s")
            time.sleep(poll_interval)
        return self.view

    def result(self, timeout: float | None = None, poll_interval: float = 0.5) -> Any:
        """Wait for the job; an analysis comes back as a DataFrame, other kinds as dicts.

        Raises:
            JobFailed: the job failed (its `code` says why); `Cancelled` if cancelled.
            TimeoutError: it did not end within `timeout` seconds.

        """
        view = self.wait(timeout, poll_interval)
        return result_of(view, self.request)

    def cancel(self) -> dict[str, Any]:
        """Cancel the job (a running one stops within about a second); return its view."""
        self.view = self.client.request("DELETE", f"/api/v2/jobs/{self.id}")
        return self.view

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Stream the job's server-sent events: `status`, `progress`, then `done`."""
        path = f"/api/v2/jobs/{self.id}/events"
        with self.client.http.stream("GET", path, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                raise_for(response)
            for event, data in sse_events(response.iter_lines()):
                if event == "done":
                    self.view = data
                yield event, data


def result_of(view: dict[str, Any], request: dict[str, Any]) -> Any:
    """Return the result of an ended job: a DataFrame for an analysis, else the response dict."""
    if view["status"] != "completed":
        raise job_error(view)
    result = view.get("result")
    if result is None:
        raise JobFailed(
            "no_result", "the job completed without a result", {"job_id": view["job_id"]}
        )
    if view["kind"] == "analyze":
        return analysis_frame(result, request)
    return result
