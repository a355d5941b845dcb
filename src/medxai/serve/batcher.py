"""Dynamic micro-batching: concurrent requests gathered into one forward (and one backward) pass.

A request waits in a queue until ``max_batch`` requests of its kind are there or the first of them has waited
``max_wait_ms``; the batch then runs on ONE worker thread (the model is not used from two threads at once), and each
caller gets its own result back, in the order the batch held them. What may share a batch is told by a key: all
predictions share one, explanations share one per CAM method and target. This is the scheme of Triton's dynamic
batcher and Ray Serve's ``@serve.batch`` (a size limit and a wait limit), kept to a small asyncio class because the
model lives in this process.

A caller that times out is told so at once; its request is dropped from the queue if it has not started, and its
result is discarded if it has.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MicroBatcher", "QueueFullError"]

logger = logging.getLogger(__name__)

#: ``run_batch(key, items) -> results``: one result per item, in order; an item's result may be an exception
#: instance, which is raised to that caller alone.
BatchFunction = Callable[[Hashable, list[Any]], Sequence[Any]]


class QueueFullError(Exception):
    """More requests are waiting than the queue holds."""


@dataclass
class _Job:
    key: Hashable
    item: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Gather :meth:`submit` calls into batches for ``run_batch``.

    Args:
        run_batch: see :data:`BatchFunction`; runs on the batcher's own worker thread.
        max_batch: most items per batch.
        max_wait_ms: how long the oldest waiting item may wait for others before its batch runs anyway.
        max_queue: most items waiting (not yet running); :meth:`submit` raises :class:`QueueFullError` beyond.
        on_batch: called with ``(key, size, seconds)`` after every batch (metrics).
        incoming: how many requests are on their way to :meth:`submit` (admitted, still being read or decoded). A
            batch waits for company only while some are: a lone request on an idle service runs at once, and under
            load batches fill from the requests that arrived while the previous batch ran. None: always wait up to
            ``max_wait_ms``.
    """

    def __init__(
        self,
        run_batch: BatchFunction,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
        on_batch: Callable[[Hashable, int, float], None] | None = None,
        incoming: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.incoming = incoming
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Items waiting (not yet running)."""
        return len(self._pending)

    async def start(self) -> None:
        """Start the gathering task and the worker thread (inside the running event loop)."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medxai-batch")
        self._worker = asyncio.create_task(self._run(), name="medxai-batcher")

    async def stop(self) -> None:
        """Stop gathering; waiting callers get a :class:`RuntimeError`."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, key: Hashable, item: Any, *, timeout: float | None = None) -> Any:
        """The result of ``item`` once its batch ran.

        Raises:
            QueueFullError: ``max_queue`` items are waiting already.
            asyncio.TimeoutError: no result within ``timeout`` seconds.
            Exception: whatever ``run_batch`` gave or raised for this item.
        """
        if self._worker is None:
            raise RuntimeError("the batcher is not running")
        if len(self._pending) >= self.max_queue:
            raise QueueFullError(f"{len(self._pending)} requests are waiting (queue {self.max_queue})")
        job = _Job(key, item, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            job.future.cancel()  # not started: the gatherer skips it; running: its result is dropped
            self._discard(job)
            raise

    def _discard(self, job: _Job) -> None:
        try:
            self._pending.remove(job)
        except ValueError:
            pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            jobs = await self._gather()
            if not jobs:
                continue
            key = jobs[0].key
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, key, [job.item for job in jobs])
                if len(results) != len(jobs):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} items")
            except Exception as error:
                logger.exception("a batch of %d failed", len(jobs))
                results = [error] * len(jobs)
            if self.on_batch is not None:
                self.on_batch(key, len(jobs), time.perf_counter() - started)
            for job, result in zip(jobs, results):
                if job.future.done():  # the caller timed out meanwhile
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    async def _gather(self) -> list[_Job]:
        """Wait until the oldest live job's kind fills a batch or its wait is over; take that batch off the queue."""
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()  # timed out before it ran
        if not self._pending:
            return []
        first = self._pending[0]
        deadline = first.enqueued + self.max_wait
        while self._count(first.key) < self.max_batch and not first.future.done() and self._company_coming():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        taken: list[_Job] = []
        kept: deque[_Job] = deque()
        for job in self._pending:
            if job.future.done():
                continue
            if job.key == first.key and len(taken) < self.max_batch:
                taken.append(job)
            else:
                kept.append(job)
        self._pending = kept
        return taken

    def _company_coming(self) -> bool:
        return self.incoming is None or self.incoming() > 0

    def _count(self, key: Hashable) -> int:
        return sum(1 for job in self._pending if job.key == key and not job.future.done())
