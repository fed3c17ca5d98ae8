"""The old backend's `/ws` message protocol, mapped onto v2 jobs (README §Migrating).

Each connection selects its own lens (`switch_model` answers `model_switch_complete` and says
that no global switch exists); `analyze` and `generate` become durable jobs run by this
ingress replica and answer `queued` -> `processing` -> `progress` -> `completed` (or
`generation_complete`) with the old result shapes; `queue_update` goes out every 2 s while
work is queued or running. Unknown messages get an `error` message; the socket stays open.
Closing the socket cancels its unfinished requests, as before. Auth, Origin and rate limits
as on v2 (`require_api_key` on the upgrade, the limiter per message that starts work).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from deployments.ingress.auth import Guard, client_identity, presented_key, require_api_key
from deployments.ingress.calls import admit
from deployments.ingress.errors import STATUS, Overloaded, RateLimited, body_for
from deployments.ingress.jobs import JobRunner, JobSpec, job_owner
from deployments.ingress.legacy import catalog, groups, mapping, messages
from deployments.ingress.legacy.schemas import LegacyAnalyzeOptions, LegacyGenerateOptions
from deployments.ingress.state import IngressState
from lenscore import BadInput, LensError

logger = logging.getLogger("ray.serve")

router = APIRouter(tags=["legacy"], dependencies=[Depends(require_api_key)])

QUEUE_UPDATE_SECONDS = 2.0
# Requests one socket may have unfinished at once ("queue all analyses" sends one per lens).
MAX_UNFINISHED_PER_SOCKET = 64
# Messages that start work count against the rate limit, like v2 requests.
LIMITED = {"analyze", "generate", "generate_and_analyze", "preload_group", "load_group",
           "unload_group"}  # fmt: skip


class LegacySession:
    """One `/ws` connection: its selected lens, its unfinished jobs, a send lock."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.state: IngressState = websocket.app.state.ingress
        self.runner: JobRunner = websocket.app.state.jobs
        self.guard: Guard = websocket.app.state.guard
        self.owner = job_owner(websocket, self.guard)
        self.identity = client_identity(websocket, presented_key(websocket))
        self.lens_id = mapping.default_lens_id(self.state)
        self.jobs: dict[str, dict[str, Any]] = {}  # job id -> context, client id, started
        self.answered: set[str] = set()  # cancelled jobs whose cancel was already answered
        self.generated: dict[str, str] = {}  # generate job id -> its first completion
        self.tasks: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()
        self.handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "list_model_groups": self.list_model_groups,
            "switch_model": self.switch_model,
            "switch_model_grouped": self.switch_model,
            "get_model_info": self.get_model_info,
            "analyze": self.analyze,
            "generate": self.generate,
            "generate_and_analyze": self.generate_and_analyze,
            "cancel_request": self.cancel_request,
            "interrupt": self.cancel_request,
            "status": self.status,
            "preload_group": self.preload_group,
            "load_group": self.preload_group,
            "unload_group": self.unload_group,
        }

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message; a closed socket drops it (the reader ends the session)."""
        async with self._send_lock:
            try:
                await self.websocket.send_text(json.dumps(message, default=str))
            except (WebSocketDisconnect, RuntimeError, OSError):
                logger.debug("legacy websocket closed; dropped a %s", message.get("type"))

    async def send_error(self, exc: BaseException, **fields: Any) -> None:
        """`{"type": "error", "error": message}` (old shape) plus v2's code and status."""
        body = body_for(exc)["error"]
        status = STATUS.get(body["code"], 500)
        await self.send({"type": "error", "error": body["message"], "code": body["code"],
                         "status": status, **fields})  # fmt: skip

    # -- the connection ---------------------------------------------------------------------

    async def greet(self) -> None:
        """Send what the old backend sent on connect: who we are, the groups, the queue."""
        await self.send(messages.greeting(self.state, self.lens_id))
        await self.list_model_groups({})
        await self.send({"type": "queue_update", **await self.runner.queue_stats()})

    async def dispatch(self, text: str) -> None:
        """Handle one client message; every failure is an `error` message, never a close."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            await self.send({"type": "error", "error": "the message is not valid JSON"})
            return
        kind = raw.get("type") if isinstance(raw, dict) else None
        handler = self.handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            await self.send({"type": "error", "error": f"Unknown message type: {kind!r}",
                             "code": "bad_input", "known_types": known})  # fmt: skip
            return
        try:
            if kind in LIMITED:
                self._check_rate()
            await handler(raw)
        except (LensError, ValidationError) as exc:
            await self.send_error(messages.as_lens_error(exc), request_type=kind)
        except Exception as exc:  # any other failure is a 500-style error message, logged
            await self.send_error(exc, request_type=kind)

    def _check_rate(self) -> None:
        if self.guard.limiter is not None:
            wait_seconds = self.guard.limiter.acquire(self.identity)
            if wait_seconds is not None:
                raise RateLimited(
                    "rate limit reached", {"retry_after_seconds": round(wait_seconds, 3)}
                )

    async def report_queue(self) -> None:
        """Send `queue_update` every 2 s while anything is queued or running (then once more)."""
        was_active = False
        while True:
            await asyncio.sleep(QUEUE_UPDATE_SECONDS)
            try:
                stats = await self.runner.queue_stats()
            except LensError:
                continue
            if stats["total_active"] or was_active:
                await self.send({"type": "queue_update", **stats})
            was_active = bool(stats["total_active"])

    async def close(self) -> None:
        """Cancel the closed socket's unfinished requests and background work."""
        for task in list(self.tasks):
            task.cancel()
        for job_id in list(self.jobs):
            try:
                await self.runner.cancel(job_id, self.owner)
            except LensError:
                logger.debug("job %s already gone at socket close", job_id)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- catalog and selection ----------------------------------------------------------------

    async def list_model_groups(self, raw: dict[str, Any]) -> None:
        """`model_groups_list`: groups, lenses, residency; current = this connection's lens."""
        snapshots = await self.state.snapshots(fresh=bool(raw.get("refresh")))
        await self.send(catalog.model_groups_list(self.state, snapshots, self.lens_id))

    async def switch_model(self, raw: dict[str, Any]) -> None:
        """Select a lens for this connection only (`model_switch_complete`)."""
        lens_id = raw.get("model_id")
        if not isinstance(lens_id, str) or lens_id not in self.state.group_of_lens:
            await self.send({"type": "model_switch_error", "model_id": lens_id,
                             "error": f"Unknown model: {lens_id!r}"})  # fmt: skip
            return
        self.lens_id = lens_id
        snapshots = await self.state.snapshots()
        info = catalog.model_info(self.state, lens_id, snapshots)
        await self.send(messages.switch_complete(info))

    async def get_model_info(self, raw: dict[str, Any]) -> None:
        """`model_info` for one lens (this connection's when no `model_id`)."""
        lens_id = raw.get("model_id") or self.lens_id
        if lens_id not in self.state.group_of_lens:
            await self.send({"type": "error", "error": f"Unknown model: {lens_id}"})
            return
        snapshots = await self.state.snapshots()
        await self.send(catalog.model_info(self.state, lens_id, snapshots))

    # -- requests ---------------------------------------------------------------------------

    def _lens(self, raw: dict[str, Any], options: Any) -> str:
        lens_id = raw.get("model_id") or getattr(options, "model_id", None) or self.lens_id
        self.state.group_for_lens(lens_id)
        return lens_id

    def _check_room(self) -> None:
        if len(self.jobs) >= MAX_UNFINISHED_PER_SOCKET:
            raise Overloaded(f"at most {MAX_UNFINISHED_PER_SOCKET} unfinished requests a socket")

    async def analyze(self, raw: dict[str, Any], prepare: Any = None) -> str:
        """Queue an analysis job; its events come back as the old messages."""
        self._check_room()
        options = LegacyAnalyzeOptions.model_validate(raw.get("options") or {})
        text = raw.get("text")
        if not isinstance(text, str):
            raise BadInput("analyze needs `text`")
        lens_id = self._lens(raw, options)
        v2_options, ignored = mapping.analysis_options(options)
        legacy = {"route": "ws", "ignored_options": ignored}
        spec, body = mapping.analysis_spec(
            lens_id, mapping.chat_input(text, options), v2_options, legacy
        )
        if prepare is None:
            admit(self.state, lens_id, body, "legacy ws analyze")
        client_id = raw.get("client_request_id")
        return await self._submit(spec, "analysis", client_id, prepare)

    async def generate(self, raw: dict[str, Any], client_id: Any = None) -> str:
        """Queue a generation job (`generation_complete` when done)."""
        self._check_room()
        options = LegacyGenerateOptions.model_validate(raw.get("options") or {})
        text = raw.get("text")
        if not isinstance(text, str):
            raise BadInput("generate needs `text`")
        lens_id = self._lens(raw, options)
        fields = {
            "max_new_tokens": options.num_tokens or options.max_new_tokens or 50,
            "temperature": options.temperature,
            "num_continuations": options.num_completions,
            "seed": options.seed,
        }
        legacy = {"route": "ws", "return_full_text": options.return_full_text}
        spec, body = mapping.generation_spec(
            lens_id, mapping.chat_input(text, options), fields, legacy
        )
        admit(self.state, lens_id, body, "legacy ws generate")
        return await self._submit(spec, "generation", client_id, None)

    async def generate_and_analyze(self, raw: dict[str, Any]) -> None:
        """Generate one completion, then analyse it (two jobs, two `queued` messages)."""
        generation = dict(raw.get("generation") or {})
        analysis = dict(raw.get("analysis") or {})
        client_id = raw.get("client_request_id")
        options = {**(generation.get("options") or {}), "num_completions": 1}
        generation["options"] = options
        analysis.setdefault("model_id", generation.get("model_id"))
        analysis["client_request_id"] = client_id
        analysis.setdefault("text", "")
        gen_id = await self.generate(generation, f"{client_id}_gen" if client_id else None)
        use_generated = analysis.get("use_generated_completion", True)

        async def prepare(body: dict[str, Any]) -> dict[str, Any]:
            if not use_generated:
                return body
            await self.runner.task_result(gen_id)
            text = self.generated.get(gen_id)
            if text is None:
                raise BadInput("the generation this analysis was to read failed or was cancelled")
            kept = {k: v for k, v in body.items() if k not in ("text", "messages")}
            return {**kept, "text": text}

        await self.analyze(analysis, prepare if use_generated else None)

    async def _submit(self, spec: JobSpec, context: str, client_id: Any, prepare: Any) -> str:
        # The job's own events wait until `queued` is out, so the old order holds.
        announced = asyncio.Event()
        info: dict[str, Any] = {"context": context, "client_request_id": client_id}
        job: dict[str, str] = {}

        async def listener(event: dict[str, Any]) -> None:
            await announced.wait()
            await self._on_event(job["id"], spec, event)

        stats = await self.runner.queue_stats()
        view = await self.runner.submit(spec, self.owner, listener=listener, prepare=prepare)
        job["id"] = job_id = view["job_id"]
        self.jobs[job_id] = info
        queued = {"type": "queued", "request_id": job_id, "queue_position": view["queue_position"],
                  "queue_size": stats["queue_size"] + 1, "context": context}  # fmt: skip
        if client_id is not None:
            queued["client_request_id"] = client_id
        try:
            await self.send(queued)
        finally:
            announced.set()
        return job_id

    async def _on_event(self, job_id: str, spec: JobSpec, event: dict[str, Any]) -> None:
        info = self.jobs.get(job_id, {})
        context = info.get("context", "analysis")
        ids = {"request_id": job_id, "context": context}
        if info.get("client_request_id") is not None:
            ids["client_request_id"] = info["client_request_id"]
        kind = event["event"]
        if kind == "started":
            info["started"] = time.monotonic()
            verb = "Analyzing" if context == "analysis" else "Generating"
            await self.send({"type": "processing", **ids,
                             "message": f"{verb} with {spec.lens_id}..."})  # fmt: skip
        elif kind == "progress":
            await self.send(messages.progress(ids, event, info.get("started")))
        elif kind == "finished":
            self.jobs.pop(job_id, None)
            await self._on_finished(job_id, spec, event, ids)

    async def _on_finished(
        self, job_id: str, spec: JobSpec, event: dict[str, Any], ids: dict[str, Any]
    ) -> None:
        if event["status"] == "cancelled" and job_id in self.answered:
            self.answered.discard(job_id)  # its cancel_request / interrupt was answered
            return
        message = messages.finished(self.state, spec, event, ids)
        if message["type"] == "generation_complete":
            self.generated[job_id] = (message["result"].get("completions") or [None])[0]
        await self.send(message)

    async def cancel_request(self, raw: dict[str, Any]) -> None:
        """`cancel_request` -> `request_cancelled`; `interrupt` -> `interrupted`."""
        job_id = raw.get("request_id")
        if not isinstance(job_id, str):
            await self.send({"type": "error", "error": "No request_id provided"})
            return
        view = await self.runner.cancel(job_id, self.owner)
        if view["status"] in ("completed", "failed"):
            await self.send({"type": "error", "error": f"Cannot cancel request {job_id} - "
                             f"status is {mapping.STATUS_NAMES[view['status']]}"})  # fmt: skip
            return
        self.answered.add(job_id)
        info = self.jobs.get(job_id, {})
        if raw["type"] == "interrupt":
            reply = {"type": "interrupted", "request_id": job_id,
                     "context": raw.get("context", info.get("context", "analysis"))}  # fmt: skip
            if info.get("client_request_id") is not None:
                reply["client_request_id"] = info["client_request_id"]
        else:
            reply = {"type": "request_cancelled", "request_id": job_id,
                     "message": "Request cancelled successfully"}  # fmt: skip
        await self.send(reply)

    async def status(self, raw: dict[str, Any]) -> None:
        """`status_update` for one request."""
        view = await self.runner.get(str(raw.get("request_id")), self.owner)
        await self.send({"type": "status_update", "request_id": view["job_id"],
                         "status": mapping.STATUS_NAMES[view["status"]],
                         "error": mapping.error_text(view)})  # fmt: skip

    # -- groups -------------------------------------------------------------------------------

    async def preload_group(self, raw: dict[str, Any]) -> None:
        """Load every lens of a group: progress per lens, then `group_preload_complete`."""
        group = self.state.group(str(raw.get("group_id")))
        self._spawn(self._preload(group, raw["type"]))

    async def _preload(self, group: Any, kind: str) -> None:
        try:
            async for message in groups.preload_messages(self.state, group, kind):
                await self.send(message)
        except LensError as exc:
            await self.send_error(exc, group_id=group.group_id)

    async def unload_group(self, raw: dict[str, Any]) -> None:
        """Move a group's lenses off the devices (`group_unload_complete`)."""
        group_id = raw.get("group_id")
        if not isinstance(group_id, str) or group_id not in self.state.groups:
            await self.send({"type": "group_unload_error", "group_id": group_id,
                             "error": f"Unknown group: {group_id!r}"})  # fmt: skip
            return
        self._spawn(self._unload(self.state.groups[group_id]))

    async def _unload(self, group: Any) -> None:
        await self.send(await groups.unload_message(self.state, group))


@router.websocket("/ws")
async def legacy_websocket(websocket: WebSocket) -> None:
    """Serve one client of the old page's protocol until it disconnects."""
    await websocket.accept()
    session = LegacySession(websocket)
    reporter = asyncio.ensure_future(session.report_queue())
    try:
        await session.greet()
        while True:
            await session.dispatch(await websocket.receive_text())
    except WebSocketDisconnect:
        logger.debug("legacy websocket client disconnected")
    finally:
        reporter.cancel()
        await session.close()
