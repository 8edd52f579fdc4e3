"""From a tracer's records to a job's :class:`~ovlrun.learn.report.Tally`.

bpftrace's lines come from per-CPU buffers read in turns, so they are put back in kernel
time order (within :data:`REORDER_WINDOW_NS`) before the resolver sees them; the
lookups bpftrace counted in the kernel (``@l``: absolute paths, per syscall, result and
path) arrive once, at the end, and need no resolving.  strace's lines are in order.
Everything that makes the counts incomplete is counted here and turned into notes.
"""

from __future__ import annotations

import heapq
import os
from typing import IO

from ovlrun.learn import bpftrace, strace
from ovlrun.learn.events import BY_NAME, LOOKUP_SYSCALLS, Lookup, Raw
from ovlrun.learn.report import Tally, write_events
from ovlrun.learn.resolve import Resolver, absolute

REORDER_WINDOW_NS = 2_000_000_000


class Collector:
    def __init__(self, tally: Tally, resolver: Resolver, events: IO[str] | None, strlen: int) -> None:
        self.tally = tally
        self.resolver = resolver
        self.events = events
        self.strlen = strlen
        self.pending: list[tuple[int, int, Raw]] = []  # (kernel time, sequence, record)
        self.sequence = 0
        self.done_until = 0
        self.lost = self.late = 0
        self.counted: int | None = None  # bpftrace's @n: lookups it counted in the kernel
        self.aggregated: dict[str, int] = {}

    def _deliver(self, raw: Raw) -> None:
        for lookup in self.resolver.feed(raw):
            self._count(lookup, 1)

    def _count(self, lookup: Lookup, times: int) -> None:
        self.tally.add(lookup, times)
        if self.events is not None:
            write_events(self.events, lookup, times)

    def take(self, event: tuple[int, Raw | bpftrace.Control | strace.Exit] | None, ordered: bool) -> None:
        """One parsed line; ``ordered``: the tracer's lines are in order already (strace)."""
        if event is None:
            return
        stamp, record = event
        if isinstance(record, bpftrace.Control):
            if record.what == "lost" and isinstance(record.data, int):
                self.lost += record.data
            elif record.what == "map" and isinstance(record.data, dict):
                for name, value in record.data.items():
                    if name == "@l" and isinstance(value, dict):
                        self.aggregated.update(value)
                    elif name == "@n" and isinstance(value, int):
                        self.counted = value
            return
        if isinstance(record, strace.Exit):
            self._deliver(Raw("exit", "exit", record.pid, record.pid, 0))
        elif ordered:
            self._deliver(record)
        else:
            if stamp < self.done_until:
                self.late += 1
            self.sequence += 1
            heapq.heappush(self.pending, (stamp, self.sequence, record))
            while self.pending and self.pending[0][0] < stamp - REORDER_WINDOW_NS:
                self.done_until = self.pending[0][0]
                self._deliver(heapq.heappop(self.pending)[2])

    def finish(self) -> int:
        """Deliver what is left; the number of kernel-counted lookups lost to a full map."""
        for _, _, record in sorted(self.pending):
            self._deliver(record)
        self.pending = []
        total = 0
        for key, times in self.aggregated.items():
            code, result, path = key.split(",", 2)
            syscall = LOOKUP_SYSCALLS[int(code)].name
            truncated = len(os.fsencode(path)) >= self.strlen - 1
            normal = absolute(None, path) or path  # as the resolver spells paths: '//', '.', '..', a final '/'
            self._count(Lookup(syscall, BY_NAME[syscall].kind, 0, normal, -int(result), not truncated, truncated),
                        int(times))
            total += int(times)
        return max(0, (self.counted or 0) - total)
