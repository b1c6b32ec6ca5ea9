"""asyncio front of the engine: a background thread runs `Engine.step()` while there is work and hands each
request's events to the event loop that is consuming it."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Optional, Union

from ernie_platform.inference.engine import Engine
from ernie_platform.inference.outputs import MMInputs, PrefillResult, TokenEvent
from ernie_platform.inference.sampling import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._closed = False
        self._thread_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="ernie-engine", daemon=True)
                self._thread.start()

    def _deliver(self, rid: str, item: object) -> None:
        target = self._queues.get(rid)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed
                self.engine.abort(rid)

    def _loop(self) -> None:
        while not self._closed:
            self._wake.clear()
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # fail the requests in flight rather than the thread
                log.exception("engine step failed")
                for rid in list(self._queues):
                    self._deliver(rid, e)
                    self.engine.abort(rid)
                continue
            for rid, evs in events.items():
                self._deliver(rid, evs)

    async def generate(
        self,
        request_id: str,
        prompt: Union[list[int], PrefillResult],
        params: SamplingParams,
        mm: Optional[MMInputs] = None,
    ) -> AsyncIterator[TokenEvent]:
        """Stream the request's events until all its n choices finished; closing/cancelling the consumer aborts it.
        With a PrefillResult the stream starts with its first token(s) again."""
        q: asyncio.Queue = asyncio.Queue()
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._queues[request_id] = (asyncio.get_running_loop(), q)
        done = False
        try:
            self.engine.add_request(request_id, prompt, params, mm)
            self._ensure_thread()
            self._wake.set()
            remaining = params.n
            while remaining:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                for ev in item:
                    if ev.finish_reason is not None:
                        remaining -= 1
                    yield ev
            done = True
        finally:
            self._queues.pop(request_id, None)
            if not done:
                self.engine.abort(request_id)

    async def prefill(
        self, prompt_ids: list[int], params: SamplingParams, mm: Optional[MMInputs] = None
    ) -> PrefillResult:
        return await asyncio.to_thread(self.engine.prefill, prompt_ids, params, mm)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
