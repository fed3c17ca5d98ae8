"""`AsyncLensClient`: the same calls as `LensClient`, as coroutines (httpx.AsyncClient).

For asyncio code and notebooks that already run an event loop; `analyze_many` runs its
analyses concurrently on one connection pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pandas as pd

from lensclient.client import (
    ACTIVE,
    DEFAULT_TIMEOUT_S,
    analyze_body,
    inputs_of,
    job_body,
    progress_bar,
    result_of,
    sse_events,
)
from lensclient.errors import raise_for
from lensclient.frames import analysis_frame, many_frame


class AsyncLensClient:
    """An asyncio client of one lens-serve server."""

    def __init__(
        self,
        url: str = "http://localhost:8000",
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()

    async def __aenter__(self) -> AsyncLensClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the API; return the decoded JSON or raise its typed error."""
        response = await self.http.request(method, path, **kwargs)
        raise_for(response)
        return response.json()

    async def groups(self) -> list[dict[str, Any]]:
        """Return groups with their lenses, sizes, residency and switch estimates."""
        return (await self.request("GET", "/api/v2/groups"))["groups"]

    async def lenses(self) -> pd.DataFrame:
        """Every lens, one row each."""
        return pd.DataFrame.from_records((await self.request("GET", "/api/v2/lenses"))["lenses"])

    async def analyze(
        self,
        lens_id: str,
        text: str | None = None,
        messages: list[dict[str, str]] | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Analyse a text or chat with one lens: one DataFrame row per token."""
        body = analyze_body(text, messages, options)
        result = await self.request("POST", f"/api/v2/lenses/{lens_id}/analyze", json=body)
        return analysis_frame(result, {"lens_id": lens_id, **body})

    async def analyze_many(
        self,
        lens_ids: str | Sequence[str],
        texts: str | Sequence[str] | None = None,
        messages: Sequence[list[dict[str, str]]] | None = None,
        *,
        concurrency: int = 4,
        progress: bool = True,
        **options: Any,
    ) -> pd.DataFrame:
        """Analyse every input with every lens, `concurrency` at a time (see `LensClient`)."""
        items = inputs_of(lens_ids, texts, messages)
        bar = progress_bar(len(items), progress, "analyze")
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(lens: str, index: int, text: Any, chat: Any) -> Any:
            async with gate:
                frame = await self.analyze(lens, text, chat, **options)
            bar.update(1)
            return {"lens_id": lens, "input": index}, frame

        try:
            parts = await asyncio.gather(*(one(*item) for item in items))
        finally:
            bar.close()
        return many_frame(list(parts))

    async def generate(
        self,
        lens_id: str,
        text: str | None = None,
        messages: list[dict[str, str]] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Continuations from the lens's activation model."""
        body = job_body("generate", lens_id, text, messages, fields)
        del body["kind"], body["lens_id"]
        return await self.request("POST", f"/api/v2/lenses/{lens_id}/generate", json=body)

    async def send_message(
        self, lens_id: str, messages: list[dict[str, str]], **fields: Any
    ) -> dict[str, Any]:
        """One assistant reply, ending at the end-of-turn marker."""
        body = {"messages": messages, **fields}
        return await self.request("POST", f"/api/v2/lenses/{lens_id}/send_message", json=body)

    async def submit(
        self,
        kind: str,
        lens_id: str,
        text: str | None = None,
        messages: list[dict[str, str]] | None = None,
        **fields: Any,
    ) -> AsyncJob:
        """Submit a durable job; return its handle."""
        body = job_body(kind, lens_id, text, messages, fields)
        view = await self.request("POST", "/api/v2/jobs", json=body)
        return AsyncJob(self, view, body)


class AsyncJob:
    """A submitted job, awaited from asyncio."""

    def __init__(
        self, client: AsyncLensClient, view: dict[str, Any], request: dict[str, Any]
    ) -> None:
        self.client = client
        self.view = view
        self.request = request
        self.id: str = view["job_id"]
        self.kind: str = view["kind"]

    async def status(self) -> dict[str, Any]:
        """Refresh and return the job's view."""
        self.view = await self.client.request("GET", f"/api/v2/jobs/{self.id}")
        return self.view

    async def wait(self, timeout: float | None = None, poll_interval: float = 0.5) -> dict:
        """Poll until the job ends; return its final view (TimeoutError after `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (await self.status())["status"] in ACTIVE:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {self.view['status']} after {timeout}s")
            await asyncio.sleep(poll_interval)
        return self.view

    async def result(self, timeout: float | None = None, poll_interval: float = 0.5) -> Any:
        """Wait for the job; a DataFrame for an analysis, else the response dict."""
        return result_of(await self.wait(timeout, poll_interval), self.request)

    async def cancel(self) -> dict[str, Any]:
        """Cancel the job; return its view."""
        self.view = await self.client.request("DELETE", f"/api/v2/jobs/{self.id}")
        return self.view

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Stream the job's server-sent events: `status`, `progress`, then `done`."""
        path = f"/api/v2/jobs/{self.id}/events"
        async with self.client.http.stream("GET", path, timeout=None) as response:
            if response.status_code >= 400:
                await response.aread()
                raise_for(response)
            lines = [line async for line in response.aiter_lines()]
        for event, data in sse_events(iter(lines)):
            yield event, data
