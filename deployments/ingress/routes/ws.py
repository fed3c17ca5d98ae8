"""`WS /api/v2/ws`: analyze, generate and preload over one socket, with progress events.

Protocol (JSON text frames). The client sends `{"type": "analyze"|"generate"|"preload"|
"cancel", "id": ..., ...}` with the same fields as the HTTP bodies plus `lens_id` (or
`group_id` for preload). The server answers each message, echoing its `id`, with
`{"type": "progress", "done", "total"}` events (analyze), `{"type": "lens", "item"}` events
(preload, one per lens), then `{"type": "result", "result"}` or
`{"type": "error", "status", "error": {"code", "message", "detail"}}`. Several messages may
run at once; closing the socket cancels them. Auth is checked on the upgrade (bearer header
or `?api_key=`); a refused upgrade is closed with 1008.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, WebSocket, WebSocketDisconnect
from pydantic import TypeAdapter, ValidationError

from deployments.ingress.auth import Guard, client_identity, presented_key, require_api_key
from deployments.ingress.calls import admit, open_analysis
from deployments.ingress.errors import STATUS, Overloaded, RateLimited, body_for
from deployments.ingress.preload import preload_ids, preload_lenses
from deployments.ingress.schemas import (
    PreloadRequest,
    PreloadResult,
    WsAnalyze,
    WsCancel,
    WsGenerate,
    WsMessage,
    WsPreload,
)
from deployments.ingress.state import IngressState, cancel_quietly

logger = logging.getLogger("ray.serve")

router = APIRouter(prefix="/api/v2", tags=["websocket"], dependencies=[Depends(require_api_key)])

# Requests one socket may run at once; more are refused with `overloaded`.
MAX_IN_FLIGHT_PER_SOCKET = 8

_MESSAGE = TypeAdapter(WsMessage)


class Session:
    """One WebSocket connection: its running requests and a send lock."""

    def __init__(self, websocket: WebSocket, state: IngressState, guard: Guard) -> None:
        self.websocket = websocket
        self.state = state
        self.guard = guard
        self.identity = client_identity(websocket, presented_key(websocket))
        self.tasks: set[asyncio.Task[None]] = set()
        self.by_id: dict[Any, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message; a closed socket drops it (the reader ends the session)."""
        async with self._send_lock:
            try:
                await self.websocket.send_text(json.dumps(message))
            except (WebSocketDisconnect, RuntimeError, OSError):
                logger.debug("websocket closed; dropped a %s message", message.get("type"))

    async def send_error(self, message_id: Any, exc: BaseException) -> None:
        """Send `{"type": "error", "id", "status", "error"}` for any exception."""
        body = body_for(exc)
        status = STATUS.get(body["error"]["code"], 500)
        await self.send({"type": "error", "id": message_id, "status": status, **body})

    async def dispatch(self, text: str) -> None:
        """Parse one client message and start (or cancel) its request."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError:
            await self._send_bad("malformed_json", None, "the message is not valid JSON", [])
            return
        message_id = raw.get("id") if isinstance(raw, dict) else None
        try:
            message = _MESSAGE.validate_python(raw)
        except ValidationError as exc:
            problems = [
                {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()
            ]
            await self._send_bad("bad_input", message_id, "invalid message", problems)
            return
        if isinstance(message, WsCancel):
            task = self.by_id.get(message.id)
            if task is not None:
                task.cancel()
            return
        if self.guard.limiter is not None:
            wait_seconds = self.guard.limiter.acquire(self.identity)
            if wait_seconds is not None:
                exc = RateLimited(
                    "rate limit reached", {"retry_after_seconds": round(wait_seconds, 3)}
                )
                await self.send_error(message_id, exc)
                return
        if len(self.tasks) >= MAX_IN_FLIGHT_PER_SOCKET:
            limit = MAX_IN_FLIGHT_PER_SOCKET
            await self.send_error(message_id, Overloaded(f"at most {limit} requests per socket"))
            return
        task = asyncio.create_task(self._run(message))
        self.tasks.add(task)
        self.by_id[message.id] = task
        task.add_done_callback(lambda done: self._forget(message.id, done))

    def _forget(self, message_id: Any, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.by_id.get(message_id) is task:
            del self.by_id[message_id]

    async def _send_bad(self, code: str, message_id: Any, message: str, problems: list) -> None:
        error = {"code": code, "message": message, "detail": {"problems": problems}}
        await self.send({"type": "error", "id": message_id, "status": STATUS[code], "error": error})

    async def _run(self, message: WsAnalyze | WsGenerate | WsPreload) -> None:
        try:
            if isinstance(message, WsAnalyze):
                result = await self._analyze(message)
            elif isinstance(message, WsGenerate):
                admit(self.state, message.lens_id, message, "generate")
                result = await self.state.call(message.lens_id, "generate", message.replica_body())
            else:
                result = await self._preload(message)
        except asyncio.CancelledError:
            await self.send({"type": "cancelled", "id": message.id})
            raise
        except Exception as exc:  # every failure of one request is reported to its sender
            await self.send_error(message.id, exc)
            return
        await self.send({"type": "result", "id": message.id, "result": result})

    async def _analyze(self, message: WsAnalyze) -> dict[str, Any]:
        admit(self.state, message.lens_id, message, "analyze")
        first, events = await open_analysis(self.state, message.lens_id, message)
        meta: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        try:
            pending = [first] if first is not None else []
            async for item in _chain(pending, events):
                kind = item.get("event")
                if kind == "progress":
                    await self.send(
                        {
                            "type": "progress",
                            "id": message.id,
                            "done": item["done"],
                            "total": item["total"],
                        }
                    )
                elif kind == "meta":
                    meta = item["meta"]
                elif kind == "row":
                    rows.append(item["row"])
        finally:
            cancel_quietly(events)
        return {"meta": meta, "rows": rows}

    async def _preload(self, message: WsPreload) -> dict[str, Any]:
        group = self.state.group(message.group_id)
        lens_ids = preload_ids(group, PreloadRequest(lens_ids=message.lens_ids))
        results = []
        async for item in preload_lenses(self.state, group, lens_ids):
            results.append(item)
            await self.send(
                {"type": "lens", "id": message.id, "item": item.model_dump(exclude_none=True)}
            )
        return PreloadResult(group_id=group.group_id, results=results).model_dump(exclude_none=True)

    def cancel_all(self) -> None:
        """Cancel every running request (the socket closed)."""
        for task in list(self.tasks):
            task.cancel()


async def _chain(first: list[Any], rest: Any) -> Any:
    for item in first:
        yield item
    async for item in rest:
        yield item


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    """Serve one WebSocket client until it disconnects."""
    await websocket.accept()
    session = Session(websocket, websocket.app.state.ingress, websocket.app.state.guard)
    try:
        while True:
            await session.dispatch(await websocket.receive_text())
    except WebSocketDisconnect:
        logger.debug("websocket client disconnected")
    finally:
        session.cancel_all()
