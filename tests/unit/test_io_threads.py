"""spillcache._internal.io.io_threads: the I/O pool's order, cancellation and shutdown."""

from __future__ import annotations

import threading

import pytest

from spillcache._internal.io.io_threads import READ, WRITE, IOPool


def blocked_pool(threads: int = 1) -> tuple[IOPool, threading.Event]:
    """A pool whose only thread is busy until the returned event is set."""
    pool = IOPool("test-io", threads)
    release, started = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        assert release.wait(timeout=30)

    pool.submit(WRITE, block)
    assert started.wait(timeout=30)
    return pool, release


def test_reads_overtake_queued_writes_and_each_priority_keeps_its_order():
    pool, release = blocked_pool()
    ran: list[str] = []
    futures = [
        pool.submit(WRITE, ran.append, "write 1"),
        pool.submit(WRITE, ran.append, "write 2"),
        pool.submit(READ, ran.append, "read 1"),
        pool.submit(READ, ran.append, "read 2"),
    ]
    release.set()
    for future in futures:
        future.result(timeout=30)
    assert ran == ["read 1", "read 2", "write 1", "write 2"]
    pool.close()


def test_results_and_errors_come_back_through_the_future():
    pool = IOPool("test-io", 2)
    assert pool.submit(READ, sum, [1, 2, 3]).result(timeout=30) == 6
    with pytest.raises(ZeroDivisionError):
        pool.submit(READ, lambda: 1 / 0).result(timeout=30)
    pool.close()


def test_close_cancels_queued_work_finishes_running_work_and_joins():
    pool, release = blocked_pool()
    queued = pool.submit(WRITE, lambda: "never")
    cancelled = threading.Event()
    queued.add_done_callback(lambda _: cancelled.set())
    closer = threading.Thread(target=pool.close)
    closer.start()
    assert cancelled.wait(timeout=30)  # close() drained the queue before joining
    assert queued.cancelled()
    release.set()  # the running work finishes; then close() can join the thread
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert not any(t.name.startswith("test-io") for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(READ, print)
    pool.close()  # twice is fine


def test_wait_idle_returns_when_everything_submitted_has_run():
    pool, release = blocked_pool(threads=2)
    ran: list[int] = []
    for n in range(5):
        pool.submit(READ, ran.append, n)
    release.set()
    pool.wait_idle()
    assert sorted(ran) == [0, 1, 2, 3, 4]
    pool.close()


def test_close_from_a_pool_thread_does_not_join_itself():
    pool = IOPool("test-io", 1)
    pool.submit(READ, pool.close).result(timeout=30)
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(READ, print)


def test_a_pool_needs_a_thread():
    with pytest.raises(ValueError, match="at least one thread"):
        IOPool("test-io", 0)
