"""Gathers concurrent requests into one batched call on a single worker thread.

Coroutines `submit` a payload under a key and await a future; the worker takes the first waiting
item, waits at most `max_wait_s` (counted from when that item arrived) for up to `max_batch - 1`
more with the same key, runs `run_batch(key, payloads)` once, and resolves every future through
`loop.call_soon_threadsafe`. The event loop never runs the batch itself.

Callers announce requests that will submit soon (`incoming`, e.g. while they decode); the worker
waits for more only while some are announced, so a lone request never waits for company.

With `workers` > 1, that many threads gather and run batches from the same queue, so a batch can
start while the one before it finishes: on a CPU encoder that runs each image on its own core, the
cores would otherwise idle while the last images of a batch, its search and its metadata lookup run.

A batch may run in two stages, `run_batch` (the forward pass) and `finish` (search, metadata): then
one worker at a time runs `run_batch`, and a worker whose batch could not start its forward anyway,
because another batch's forward holds the encoder, keeps gathering until it is free (past
`max_wait_s`): under load a batch takes everything that arrived during the forward before it, while
its search still overlaps the next forward. A lone request never waits: the encoder is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

LOG = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are waiting than `max_queue`: the caller should answer 503 and let clients retry."""


class BatcherStopped(RuntimeError):
    """The batcher was stopped before this item ran."""


@dataclass(frozen=True)
class BatchInfo:
    """How an item was served: time queued before its batch started, the batch's size and run time."""

    queued_s: float
    batch_size: int
    run_s: float


@dataclass
class _Item:
    key: Hashable
    payload: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


def _post(item: _Item, value: Any, error: BaseException | None) -> None:
    try:
        item.loop.call_soon_threadsafe(_resolve, item.future, value, error)
    except RuntimeError:  # the loop is closed: the server stopped and nobody awaits this any more
        LOG.debug("dropped a result for a closed event loop")


def _resolve(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting request was cancelled (client went away)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class MicroBatcher:
    """`run_batch(key, payloads) -> results` (same length) runs on a worker thread, one batch at a
    time per worker. With `finish`, `run_batch(key, payloads) -> encoded` runs on one worker at a time
    and `finish(key, payloads, encoded) -> results` on each worker as soon as its `run_batch` returns."""

    def __init__(
        self,
        run_batch: Callable[[Hashable, Sequence[Any]], Sequence[Any]],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] | None = None,
        on_start: Callable[[], None] | None = None,
        name: str = "sbir-batcher",
        workers: int = 1,
        finish: Callable[[Hashable, Sequence[Any], Any], Sequence[Any]] | None = None,
    ):
        assert max_batch >= 1 and max_wait_s >= 0 and max_queue >= 1, "batch limits must be positive"
        assert workers >= 1, "at least one worker thread"
        self._run_batch = run_batch
        self._finish = finish
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        # Unbounded, so that stop signals never block; `enqueue` enforces max_queue for items. One
        # condition wakes a gathering worker for both things it waits for: an item, a free encoder.
        self._queue: deque = deque()
        self._ready = threading.Condition(threading.Lock())
        self._encoding = False  # a batch is in `run_batch` (two stages only; under _ready)
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._on_start = on_start
        names = [name] if workers == 1 else [f"{name}-{i}" for i in range(workers)]
        self._threads = [threading.Thread(target=self._work, name=n, daemon=True) for n in names]
        self._running = 0  # worker threads that have not exited (under _lifecycle)
        self._stopped = False
        self._stop_reason = "the service is shutting down"
        self._lifecycle = threading.Lock()
        self._incoming = 0  # written on the event loop only; the worker just reads it

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce that a request is on its way: wrap the work before it *and* its `enqueue`."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    def start(self) -> None:
        with self._lifecycle:
            self._running = len(self._threads)
        for thread in self._threads:
            thread.start()

    def depth(self) -> int:
        """Items waiting for a batch (approximate, as any queue size read from another thread)."""
        return len(self._queue)

    def _put(self, item: Any) -> None:
        with self._ready:
            self._queue.append(item)
            self._ready.notify_all()

    def enqueue(self, key: Hashable, payload: Any) -> asyncio.Future:
        """Queue one payload (on the event loop); await the future for (result, BatchInfo).

        Raises QueueFull at once when `max_queue` items are already waiting, BatcherStopped when the
        batcher was stopped or its worker died.
        """
        loop = asyncio.get_running_loop()
        item = _Item(key, payload, loop.create_future(), loop)
        with self._lifecycle:  # never queue behind a worker that has exited: the item would wait forever
            if self._stopped:
                raise BatcherStopped(self._stop_reason)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting for the encoder")
            self._put(item)
        return item.future

    async def submit(self, key: Hashable, payload: Any) -> tuple[Any, BatchInfo]:
        """Queue one payload and wait for its result."""
        return await self.enqueue(key, payload)

    @property
    def alive(self) -> bool:
        """Every worker is running and accepting items."""
        return not self._stopped and all(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 10.0) -> None:
        """Let queued items finish, then end the worker threads."""
        with self._lifecycle:
            if self._stopped:
                return
            self._stopped = True
        live = [t for t in self._threads if t.is_alive()]
        for _ in live:  # one stop signal per worker, behind everything already queued
            self._put(_STOP)
        deadline = time.monotonic() + timeout
        for thread in live:
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- worker thread ----------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()  # e.g. per-thread settings of the libraries run_batch uses
            self._serve()
        except BaseException:
            LOG.critical(
                "the batcher's worker died; /search answers 503 until the service restarts", exc_info=True
            )
            with self._lifecycle:
                self._stopped = True
                self._stop_reason = "the encoder worker stopped (see the server log)"
            for _ in self._threads[1:]:  # the other workers finish what is queued, then stop too
                self._put(_STOP)
        finally:
            with self._lifecycle:
                self._running -= 1
                last = self._running == 0
            if last:  # other workers still serve what is queued; the last one fails what is left
                self._fail_leftovers()

    def _serve(self) -> None:
        carried: _Item | None = None
        while True:
            first = carried if carried is not None else self._take()
            carried = None
            if first is _STOP:
                break
            batch, carried, stop = self._gather(first)
            self._run(batch)
            if stop:
                break
        if carried is not None and carried is not _STOP:
            self._claim_encoder()
            self._run([carried])

    def _take(self) -> Any:
        with self._ready:
            while not self._queue:
                self._ready.wait()
            return self._queue.popleft()

    def _gather(self, first: _Item) -> tuple[list[_Item], _Item | None, bool]:
        """`first` plus what arrives before its deadline, same key only; returns (batch, carried, stop).

        In two stages, it returns holding the encoder (`_encoding`), and keeps gathering past the
        deadline while another batch holds it."""
        batch = [first]
        deadline = first.enqueued + self.max_wait_s
        with self._ready:
            while len(batch) < self.max_batch:
                if self._queue:
                    item = self._queue.popleft()
                    if item is _STOP:
                        self._claim_encoder_locked()
                        return batch, None, True
                    if item.key != first.key:
                        self._claim_encoder_locked()
                        return batch, item, False  # after a snapshot swap: the next batch starts with it
                    batch.append(item)
                    continue
                if self._finish is not None and self._encoding:
                    self._ready.wait()  # woken by an item or by the encoder coming free
                    continue
                timeout = deadline - time.perf_counter()
                if self._incoming <= 0 or timeout <= 0:
                    break  # nobody else is on the way, or the wait is over
                self._ready.wait(timeout)
            self._claim_encoder_locked()
        return batch, None, False

    def _claim_encoder(self) -> None:
        with self._ready:
            self._claim_encoder_locked()

    def _claim_encoder_locked(self) -> None:
        if self._finish is None:
            return
        while self._encoding:
            self._ready.wait()
        self._encoding = True

    def _release_encoder(self) -> None:
        if self._finish is None:
            return
        with self._ready:
            self._encoding = False
            self._ready.notify_all()

    def _run(self, batch: list[_Item]) -> None:
        """Runs the batch, the encoder already claimed (two stages); releases it after `run_batch`."""
        live = [it for it in batch if not it.future.cancelled()]
        if not live:
            self._release_encoder()
            return
        start = time.perf_counter()
        error: BaseException | None = None
        results: Sequence[Any] = ()
        key, payloads = live[0].key, [it.payload for it in live]
        try:
            try:
                results = self._run_batch(key, payloads)
            finally:
                self._release_encoder()
            if self._finish is not None:
                results = self._finish(key, payloads, results)
            assert len(results) == len(live), (
                f"run_batch returned {len(results)} results for {len(live)} items"
            )
        except Exception as exc:  # not swallowed: re-raised in every request of the batch
            LOG.exception("batch of %d failed", len(live))
            error = exc
        run_s = time.perf_counter() - start
        if self._on_batch is not None:
            self._on_batch(len(live), run_s)
        for i, it in enumerate(live):
            info = BatchInfo(queued_s=start - it.enqueued, batch_size=len(live), run_s=run_s)
            value = None if error is not None else (results[i], info)
            _post(it, value, error)

    def _fail_leftovers(self) -> None:
        while True:
            with self._ready:
                if not self._queue:
                    return
                item = self._queue.popleft()
            if item is not _STOP:
                _post(item, None, BatcherStopped(self._stop_reason))
