"""Which delivery each prefork pool child has ended its span for, told to the main process.

The worker's main process emits the span of a delivery whose pool child could not
(mainprocess.py): a hard time limit, a lost child, ``revoke(terminate=True)``. Celery
decides those from what the main process has *read* from the child, and a child
writes its result before the main process reads it. A child lost in that gap has
already run the task and ended its span, and Celery still reports the delivery as
lost: two spans for one delivery. It happens when

* billiard sends the soft-time-limit signal a second time at warm shutdown
  (``finish_at_shutdown`` scans its job cache with a fresh record of which jobs it
  already signalled); the signal lands in the child's wait for its result to be read,
  and the child exits with code 1 (seen in our CI, the log of celery/celery#2952 shows
  the same traceback);
* the child is killed (OOM, SIGKILL) or hits its hard limit just after the task, in a
  ``task_postrun`` receiver after ours, or while its result is in the pipe.

So each child keeps one slot in an anonymous shared mapping made by the main process
before the pool forks: its pid, a checksum of the task id whose span it ended last,
that ending's number, and the number of the last ending the child's flush handed to
the exporter (lifecycle.Flusher, after tasks and at exit). The main process looks up
the lost child's pid and the delivery's task id before emitting, and emits nothing
when the child ended that span and flushed it: a child killed before its flush loses
the span it held, and the main process's span then stands in for it. A child clears
its record when its next task starts (a retry keeps the task id). Slots are chosen by
pid, so two live children may share one: then one child's record is lost and the main
process emits as before (two spans); a lookup never matches a pid and task id the child
did not write.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib

from . import lifecycle

_SLOTS = 4096  # 80 KiB; pids of live children rarely collide modulo this
_RECORD = struct.Struct("<iII")  # pid, crc32 of the task id, number of that ending
_FLUSHED = struct.Struct("<iI")  # pid, the last ending number flushed; after the record
_SIZE = _RECORD.size + _FLUSHED.size

_table: mmap.mmap | None = None
_owner = -1  # the lifecycle.generation that made the table
# (generation, pid, slot offset) of this process: os.getpid() is a system call.
_mine: tuple[int, int, int] = (-1, 0, 0)
_endings = 0  # spans ended in this process (numbered from 1 after each fork)


def share() -> None:
    """Make the table, in the process whose pool children will write to it (once)."""
    global _table, _owner
    if _table is None:
        _table = mmap.mmap(-1, _SLOTS * _SIZE)  # MAP_SHARED | MAP_ANONYMOUS
        _owner = lifecycle.generation


def written_here() -> bool:
    """Whether this process records its endings: a fork of the table's owner. Callers
    on the hot path cache the answer per lifecycle.generation."""
    return _table is not None and lifecycle.generation != _owner


def _checksum(task_id: str) -> int:
    return zlib.crc32(task_id.encode("utf-8", "surrogatepass"))


def _slot() -> tuple[int, int] | None:
    """(pid, offset) of this process's slot; None where nobody reads it."""
    global _mine, _endings
    if _table is None or lifecycle.generation == _owner:
        return None  # not a fork of the table's owner: nobody emits for us
    if _mine[0] != lifecycle.generation:
        pid = os.getpid()
        _mine = (lifecycle.generation, pid, (pid % _SLOTS) * _SIZE)
        _endings = 0
        _FLUSHED.pack_into(_table, _mine[2] + _RECORD.size, pid, 0)
    return _mine[1], _mine[2]


def starting() -> None:
    """In a pool child, a task starts: the record of the previous one no longer applies."""
    slot = _slot()
    if slot is not None and _table is not None:
        _RECORD.pack_into(_table, slot[1], 0, 0, 0)


def ended(task_id: str) -> None:
    """In a pool child: the span of this delivery is ended (not yet exported)."""
    global _endings
    slot = _slot()
    if slot is not None and _table is not None:
        _endings = (_endings + 1) & 0xFFFFFFFF
        _RECORD.pack_into(_table, slot[1], slot[0], _checksum(task_id), _endings)


def before_flush() -> int:
    """The ending number a flush starting now covers (every span ended so far)."""
    return _endings


def flushed(mark: int) -> None:
    """The flush that began at ``mark`` has handed every span ended by then over."""
    slot = _slot()
    if slot is not None and _table is not None and mark:
        _FLUSHED.pack_into(_table, slot[1] + _RECORD.size, slot[0], mark)


def ended_in(pid: object, task_id: str) -> bool:
    """In the main process: whether child ``pid`` ended and flushed the span of
    ``task_id``. A match is taken (cleared), so a later delivery is asked afresh."""
    table = _table
    if table is None or not isinstance(pid, int) or pid <= 0:
        return False
    offset = (pid % _SLOTS) * _SIZE
    found_pid, checksum, number = _RECORD.unpack_from(table, offset)
    flusher, flushed_up_to = _FLUSHED.unpack_from(table, offset + _RECORD.size)
    if (found_pid, flusher) != (pid, pid) or checksum != _checksum(task_id):
        return False
    if not 0 < number <= flushed_up_to:  # ended, not flushed: lost with the child
        return False
    _RECORD.pack_into(table, offset, 0, 0, 0)
    return True
