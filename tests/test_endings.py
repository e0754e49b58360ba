"""endings.py across real forks: what a pool child records, what the main process reads."""

from __future__ import annotations

import os
from collections.abc import Callable

from otel_celery_headers import endings, lifecycle

TASK = "5f0b8c1e-1c2d-4c47-9a7e-3f4b2a1d0e9c"


def in_child(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child (as billiard forks pool children); its pid."""
    endings.share()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid


def finish(task_id: str, flush: bool = True) -> Callable[[], None]:
    def body() -> None:
        endings.starting()
        endings.ended(task_id)
        if flush:
            endings.flushed(endings.before_flush())
    return body


def test_a_span_ended_and_flushed_in_the_child_is_found_once():
    pid = in_child(finish(TASK))
    assert endings.ended_in(pid, TASK) is True
    # Taken: a later delivery with this id (a retry) is asked afresh.
    assert endings.ended_in(pid, TASK) is False


def test_a_span_ended_but_not_flushed_is_not_found():
    """The child held the span when it died: the main process must emit its own."""
    pid = in_child(finish(TASK, flush=False))
    assert endings.ended_in(pid, TASK) is False


def test_the_next_task_clears_the_record():
    """A retry runs with the same task id: once it starts, the earlier ending does not count."""
    def body() -> None:
        finish(TASK)()
        endings.starting()
    pid = in_child(body)
    assert endings.ended_in(pid, TASK) is False


def test_only_the_childs_own_pid_and_task_id_match():
    pid = in_child(finish(TASK))
    assert endings.ended_in(pid, "another-task") is False
    assert endings.ended_in(pid + 1, TASK) is False
    assert endings.ended_in(None, TASK) is False
    assert endings.ended_in(pid, TASK) is True


def test_a_flush_in_another_child_sharing_the_slot_does_not_count():
    """Two live children whose pids share a slot: one's flush does not vouch for the other's span."""
    first = in_child(finish(TASK, flush=False))

    def other_child_same_slot() -> None:
        endings.starting()  # its first task sets its slot up
        # A pid that falls in the first child's slot, as first + _SLOTS would.
        slot = (first % endings._SLOTS) * endings._SIZE
        endings._mine = (lifecycle.generation, first + endings._SLOTS, slot)
        endings.flushed(1)  # its own first span flushed: only the flush mark is written

    in_child(other_child_same_slot)
    assert endings.ended_in(first, TASK) is False


def test_the_process_that_made_the_table_records_nothing():
    """Solo, threads, gevent: no pool child, nobody emits for this process."""
    endings.share()
    finish(TASK)()
    assert endings.ended_in(os.getpid(), TASK) is False


def test_a_grandchild_writes_its_own_slot():
    """A child forked again (generation + 2) records under its own pid."""
    def body() -> None:
        pid = os.fork()
        if pid == 0:
            try:
                finish(TASK)()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert endings.ended_in(pid, TASK) is True
    in_child(body)
