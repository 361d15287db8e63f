"""The micro-batcher: gathers concurrent requests, respects its limits, never blocks the loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batcher import BatcherStopped, MicroBatcher, QueueFull


class Recorder:
    """run_batch double: doubles each payload and remembers the batches it saw. With `hold`, each
    batch sets `started` and then waits until the test sets `release`."""

    def __init__(self, delay: float = 0.0, fail_on: object = None, hold: bool = False):
        self.batches: list[tuple[object, list]] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.fail_on = fail_on
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, key, payloads):
        self.threads.add(threading.current_thread().name)
        self.batches.append((key, list(payloads)))
        self.started.set()
        assert self.release.wait(30), "the test never released the batch"
        time.sleep(self.delay)
        if self.fail_on in payloads:
            raise RuntimeError("boom")
        return [p * 2 for p in payloads]


def run(coro):
    return asyncio.run(coro)


async def announced(b: MicroBatcher, key, payload, work_s: float = 0.0):
    """As the service does: announce the request while it decodes, enqueue, then wait."""
    with b.incoming():
        await asyncio.sleep(work_s)
        waiting = b.enqueue(key, payload)
    return await waiting


def test_concurrent_requests_share_one_batch_and_get_their_own_results():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=8, max_wait_s=0.2, max_queue=64)
    b.start()

    async def main():
        return await asyncio.gather(*(announced(b, "k", i, work_s=0.01) for i in range(8)))

    out = run(main())
    b.stop()
    assert [r for r, _ in out] == [i * 2 for i in range(8)]
    assert [len(p) for _, p in rec.batches] == [8]
    assert all(info.batch_size == 8 for _, info in out)
    assert rec.threads == {"sbir-batcher"}


def test_max_batch_is_respected():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=3, max_wait_s=0.05, max_queue=64)
    b.start()

    async def main():
        return await asyncio.gather(*(announced(b, "k", i, work_s=0.01) for i in range(10)))

    out = run(main())
    b.stop()
    assert sorted(r for r, _ in out) == [i * 2 for i in range(10)]
    sizes = [len(p) for _, p in rec.batches]
    assert max(sizes) == 3 and sum(sizes) == 10


def test_a_lone_request_does_not_wait_for_company():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=16, max_wait_s=3600.0, max_queue=64)  # waiting at all would hang
    b.start()

    async def main():
        return await asyncio.wait_for(announced(b, "k", 1), timeout=30)

    r, info = run(main())
    b.stop()
    assert r == 2 and info.batch_size == 1


def test_a_batch_waits_at_most_max_wait_for_announced_requests():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=16, max_wait_s=0.05, max_queue=64)
    b.start()

    async def main():
        first_answered = asyncio.Event()

        async def slow():  # announced, but it enqueues only after the other one is answered
            with b.incoming():
                await first_answered.wait()
                waiting = b.enqueue("k", 2)
            return await waiting

        late = asyncio.ensure_future(slow())
        await asyncio.sleep(0)  # it is announced now
        answer = await asyncio.wait_for(announced(b, "k", 1), timeout=30)
        first_answered.set()
        return answer, await late

    (r, info), (r_late, _) = run(main())
    b.stop()
    # It waited for the announced request (until its deadline: queued_s counts from its arrival),
    # and then ran without it: the other one could not arrive before this one was answered.
    assert r == 2 and r_late == 4 and info.batch_size == 1
    assert info.queued_s >= 0.05
    assert [len(p) for _, p in rec.batches] == [1, 1]


def test_keys_are_never_mixed_in_one_batch():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch=16, max_wait_s=0.1, max_queue=64)
    b.start()

    async def main():
        return await asyncio.gather(*(announced(b, "old" if i % 3 else "new", i, 0.01) for i in range(12)))

    out = run(main())
    b.stop()
    assert [r for r, _ in out] == [i * 2 for i in range(12)]
    for key, payloads in rec.batches:
        assert all(("old" if p % 3 else "new") == key for p in payloads)


def test_a_failing_batch_fails_its_requests_only_and_the_worker_goes_on():
    rec = Recorder(fail_on=3)
    b = MicroBatcher(rec, max_batch=1, max_wait_s=0.0, max_queue=64)
    b.start()

    async def main():
        return await asyncio.gather(*(b.submit("k", i) for i in range(5)), return_exceptions=True)

    out = run(main())
    b.stop()
    assert isinstance(out[3], RuntimeError)
    assert [o[0] for o in out if not isinstance(o, Exception)] == [0, 2, 4, 8]


def test_a_full_queue_is_refused_at_once():
    rec = Recorder(hold=True)
    b = MicroBatcher(rec, max_batch=1, max_wait_s=0.0, max_queue=2)
    b.start()

    async def main():
        first = asyncio.ensure_future(b.submit("k", 0))
        assert await asyncio.to_thread(rec.started.wait, 30)  # the worker is now busy with it
        queued = [asyncio.ensure_future(b.submit("k", i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit("k", 3)
        rec.release.set()
        return await asyncio.gather(first, *queued)

    out = run(main())
    b.stop()
    assert [r for r, _ in out] == [0, 2, 4]


def test_the_event_loop_keeps_running_while_a_batch_computes():
    """The batch is released by a coroutine on the event loop: it finishes only if the loop runs
    while the batch computes (a batch run on the loop would wait for it forever)."""
    rec = Recorder(hold=True)
    b = MicroBatcher(rec, max_batch=4, max_wait_s=0.0, max_queue=8)
    b.start()

    async def main():
        async def release_once_started():
            while not rec.started.is_set():
                await asyncio.sleep(0.001)
            rec.release.set()

        releaser = asyncio.ensure_future(release_once_started())
        answer = await asyncio.wait_for(b.submit("k", 1), timeout=30)
        await releaser
        return answer

    r, _ = run(main())
    b.stop()
    assert r == 2 and rec.threads == {"sbir-batcher"}


def test_submit_after_stop_is_refused():
    b = MicroBatcher(Recorder(), max_batch=2, max_wait_s=0.0, max_queue=4)
    b.start()
    b.stop()

    async def main():
        await b.submit("k", 1)

    with pytest.raises(BatcherStopped):
        run(main())


def test_on_start_runs_on_the_worker_thread_before_any_batch():
    seen: list[str] = []
    rec = Recorder()
    b = MicroBatcher(
        rec,
        max_batch=2,
        max_wait_s=0.0,
        max_queue=4,
        on_start=lambda: seen.append(threading.current_thread().name),
    )
    b.start()

    async def main():
        return await announced(b, "k", 1)

    run(main())
    b.stop()
    assert seen == ["sbir-batcher"] and rec.threads == {"sbir-batcher"}


def test_a_dead_worker_fails_requests_instead_of_leaving_them_waiting():
    def broken_setup():
        raise RuntimeError("bad thread setting")

    b = MicroBatcher(Recorder(), max_batch=2, max_wait_s=0.0, max_queue=4, on_start=broken_setup)
    b.start()
    b._threads[0].join(5)
    assert not b.alive

    async def main():
        return await asyncio.wait_for(b.submit("k", 1), timeout=5)

    with pytest.raises(BatcherStopped, match="worker stopped"):
        run(main())


def test_two_workers_run_two_batches_at_once():
    """With workers=2 a batch starts while the one before it is still running."""
    both_running = threading.Barrier(2, timeout=5)
    rec = Recorder()

    def run_batch(key, payloads):
        both_running.wait()  # breaks (and fails the batch) unless another batch runs at the same time
        return rec(key, payloads)

    b = MicroBatcher(run_batch, max_batch=1, max_wait_s=0.0, max_queue=8, workers=2)
    b.start()

    async def main():
        return await asyncio.gather(b.submit("k", 1), b.submit("k", 2))

    results = run(main())
    b.stop()
    assert [r for r, _ in results] == [2, 4]
    assert rec.threads == {"sbir-batcher-0", "sbir-batcher-1"}
    assert not any(t.is_alive() for t in b._threads)


def test_stopping_two_workers_finishes_everything_queued():
    rec = Recorder(delay=0.02)
    b = MicroBatcher(rec, max_batch=2, max_wait_s=0.0, max_queue=32, workers=2)
    b.start()

    async def main():
        waiting = [b.enqueue("k", i) for i in range(10)]
        await asyncio.to_thread(b.stop)  # queued items run before the workers exit
        return await asyncio.gather(*waiting)

    results = run(main())
    assert sorted(r for r, _ in results) == [2 * i for i in range(10)]
    assert not any(t.is_alive() for t in b._threads) and not b.alive


def test_one_dead_worker_of_two_stops_the_batcher_without_losing_queued_requests():
    calls = []

    def fails_once():
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("bad thread setting")

    rec = Recorder(delay=0.05)
    b = MicroBatcher(rec, max_batch=1, max_wait_s=0.0, max_queue=8, on_start=fails_once, workers=2)

    async def main():
        waiting = [b.enqueue("k", i) for i in range(3)]  # queued before the workers start
        b.start()
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), timeout=10)
        with pytest.raises(BatcherStopped, match="worker stopped"):
            b.enqueue("k", 9)
        return results

    results = run(main())
    for t in b._threads:
        t.join(5)
    assert not b.alive and not any(t.is_alive() for t in b._threads)
    # the surviving worker served what was queued (none waits forever, none is lost)
    assert sorted(r for r, _ in results) == [0, 2, 4]


class TwoStages:
    """run_batch / finish doubles: records which stage ran when; `hold` blocks the first forward
    until the test sets `release`."""

    def __init__(self, hold: bool = False, fail_forward_on: object = None):
        self.forwards: list[list] = []
        self.events: list[tuple[str, int]] = []
        self.encoding = 0
        self.overlapped = False  # two forwards ran at once
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail_forward_on = fail_forward_on
        if not hold:
            self.release.set()

    def forward(self, key, payloads):
        with self.lock:
            self.encoding += 1
            self.overlapped |= self.encoding > 1
            self.forwards.append(list(payloads))
        self.started.set()
        try:
            assert self.release.wait(30), "the test never released the forward"
            time.sleep(0.01)
            if self.fail_forward_on in payloads:
                raise RuntimeError("forward failed")
            return [p * 10 for p in payloads]
        finally:
            with self.lock:
                self.encoding -= 1

    def finish(self, key, payloads, encoded):
        assert len(encoded) == len(payloads)
        return [e + 1 for e in encoded]


def two_stage_batcher(stages: TwoStages, **kw) -> MicroBatcher:
    kw = {"max_batch": 16, "max_wait_s": 0.0, "max_queue": 64, "workers": 2, **kw}
    return MicroBatcher(stages.forward, finish=stages.finish, **kw)


def test_two_stages_run_one_forward_at_a_time_and_finish_each_batch():
    stages = TwoStages()
    b = two_stage_batcher(stages, max_batch=2)
    b.start()

    async def main():
        return await asyncio.gather(*(b.submit("k", i) for i in range(12)))

    out = run(main())
    b.stop()
    assert [r for r, _ in out] == [10 * i + 1 for i in range(12)]
    assert not stages.overlapped and sum(len(f) for f in stages.forwards) == 12


def test_a_batch_gathers_past_max_wait_while_another_forward_holds_the_encoder():
    """max_wait 0: one-stage batches would start with whatever is queued. Here the second batch
    waits for the first forward to end, and by then all the others have arrived: one batch."""
    stages = TwoStages(hold=True)
    b = two_stage_batcher(stages)
    b.start()

    async def main():
        first = asyncio.ensure_future(b.submit("k", 0))
        assert await asyncio.to_thread(stages.started.wait, 30)  # the first forward holds the encoder
        rest = [asyncio.ensure_future(b.submit("k", i)) for i in range(1, 4)]
        await asyncio.sleep(0.05)  # the other worker has taken item 1 and waits for the encoder
        rest += [asyncio.ensure_future(b.submit("k", i)) for i in range(4, 8)]
        await asyncio.sleep(0.05)
        stages.release.set()
        return await asyncio.wait_for(asyncio.gather(first, *rest), timeout=30)

    out = run(main())
    b.stop()
    assert [r for r, _ in out] == [10 * i + 1 for i in range(8)]
    assert stages.forwards == [[0], [1, 2, 3, 4, 5, 6, 7]]
    assert [info.batch_size for _, info in out] == [1] + [7] * 7


def test_two_stages_a_lone_request_does_not_wait():
    stages = TwoStages()
    b = two_stage_batcher(stages, max_wait_s=3600.0)  # waiting at all would hang

    async def main():
        return await asyncio.wait_for(announced(b, "k", 1), timeout=30)

    b.start()
    r, info = run(main())
    b.stop()
    assert r == 11 and info.batch_size == 1


def test_a_failed_forward_frees_the_encoder_and_fails_its_batch_only():
    stages = TwoStages(fail_forward_on=3)
    b = two_stage_batcher(stages, max_batch=1)
    b.start()

    async def main():
        return await asyncio.wait_for(
            asyncio.gather(*(b.submit("k", i) for i in range(6)), return_exceptions=True), timeout=30
        )

    out = run(main())
    b.stop()
    assert isinstance(out[3], RuntimeError) and "forward failed" in str(out[3])
    assert [o[0] for o in out if not isinstance(o, Exception)] == [1, 11, 21, 41, 51]


def test_two_stages_keep_keys_apart_and_stop_after_what_is_queued():
    stages = TwoStages()
    b = two_stage_batcher(stages)
    b.start()

    async def main():
        waiting = [b.enqueue("old" if i % 2 else "new", i) for i in range(10)]
        await asyncio.to_thread(b.stop)
        return await asyncio.gather(*waiting)

    out = run(main())
    assert [r for r, _ in out] == [10 * i + 1 for i in range(10)]
    for batch in stages.forwards:
        assert len({p % 2 for p in batch}) == 1
    assert not any(t.is_alive() for t in b._threads)
