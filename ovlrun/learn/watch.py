"""``learn watch``: node-wide counts of lookups under the shared trees, for every job.

One bpftrace program (:func:`ovlrun.learn.bpftrace.watch_program`) counts, in the
kernel, lookups whose path starts with a tree root, per path and class; every interval
it prints and clears its maps, and the watcher folds them into the node's summary
(:mod:`ovlrun.learn.summaries`), which it replaces atomically and, with ``--publish
DIR``, copies to DIR as the site's image owner.  In-kernel counting keeps the cost on a
busy node to the probes themselves: nothing crosses to user space per lookup.

SIGTERM or SIGINT (systemd stopping the unit) ends it after a last interval is written;
a bpftrace that dies is an error (status 1: systemd restarts the unit).  The summary of
an earlier run of this node is continued, not replaced.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from ovlrun.errors import OvlrunError
from ovlrun.learn import bpftrace, summaries
from ovlrun.learn.spawn import find_program
from ovlrun.learn.tracers import Bpftrace
from ovlrun.learn.trees import Attributor, TreeSpec
from ovlrun.linux.files import write_atomic
from ovlrun.store.siteconfig import Owner


def _prefixes(trees: list[TreeSpec]) -> list[str]:
    return sorted({p.rstrip("/") + "/" for t in trees for p in (t.root, t.real)})


def _load(directory: str, node: str, tracer: str) -> dict[str, Any]:
    path = os.path.join(directory, f"{node}.json")
    try:
        summary = summaries.read_local(path)
    except OvlrunError:
        summary = None  # missing, or not ours: start afresh (the next write replaces it)
    if summary is None or summary.get("node") != node:
        return summaries.empty(node, tracer, time.time())
    summary["tracer"] = tracer
    return summary


def publish(directory: str, owner: Owner, summary: dict[str, Any], timeout: float) -> None:
    """Write the summary into the shared DIR as the image owner, in a bounded worker."""
    from ovlrun.store.bounded import run_bounded

    data = summaries.encode(summary)
    name = f"{summary['node']}.json"

    def work() -> None:
        if os.geteuid() == 0 and owner.uid != 0:
            import prctl

            parent = os.getppid()
            os.setgroups([])
            os.setresgid(owner.gid, owner.gid, owner.gid)
            os.setresuid(owner.uid, owner.uid, owner.uid)
            prctl.set_pdeathsig(signal.SIGKILL)  # cleared by the credential change
            if os.getppid() != parent:
                os._exit(1)
        fd = summaries.open_checked(os.path.normpath(directory), None, owner, directory=True)
        try:
            write_atomic(name, data, 0o644, dir_fd=fd)
        finally:
            os.close(fd)

    run_bounded(work, timeout=timeout, what=f"publishing the node summary to {directory}")


def watch(trees: list[TreeSpec], *, interval: int, directory: str, publish_to: str | None, owner: Owner,
          timeout: float = 60.0, map_keys: int = bpftrace.MAP_KEYS,
          log: Callable[[str], None] = lambda m: print(f"ovlrun learn watch: {m}", file=sys.stderr)) -> int:
    if os.geteuid() != 0:
        raise OvlrunError("learn watch must run as root (it traces every process of the node)")
    program = find_program("bpftrace")
    if program is None:
        raise OvlrunError("bpftrace is not installed (apt-get install bpftrace)")
    node = summaries.node_name()
    tracer = Bpftrace(program, map_keys)
    summary = _load(directory, node, tracer.name)
    attributor = Attributor(trees)
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        tracer.stop()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        tracer.start(lambda fields, _: bpftrace.watch_program(fields, _prefixes(trees), interval))
        try:
            tracer.wait_ready()
        except OvlrunError:
            if stopping:
                return 0  # stopped while bpftrace was still starting
            raise
        log(f"watching {', '.join(t.root for t in trees)} with {tracer.name}; summary every {interval} s in "
            f"{directory}/{node}.json" + (f", published to {publish_to}" if publish_to else ""))
        maps: dict[str, dict[str, int]] = {}
        counters: dict[str, int] = {}
        with selectors.DefaultSelector() as sel:
            sel.register(tracer.out_r, selectors.EVENT_READ, "out")
            sel.register(tracer.err_r, selectors.EVENT_READ, "err")
            out_open = True
            while out_open:
                ready = sel.select(tracer.poll_interval())
                if not ready:
                    tracer.stop()  # bpftrace missed the signal (see Bpftrace.stop): again
                for key, _ in ready:
                    if key.data == "err":
                        if not tracer.read_stderr():
                            sel.unregister(tracer.err_r)
                        continue
                    chunk = os.read(tracer.out_r, 1 << 20)
                    if not chunk:
                        out_open = False
                    for line in tracer.lines(chunk) if chunk else tracer.rest():
                        _, record = tracer.parse(line) or (0, None)
                        if not isinstance(record, bpftrace.Control):
                            continue
                        if record.what == "map" and isinstance(record.data, dict):
                            for name, value in record.data.items():
                                name = name.lstrip("@")
                                if isinstance(value, dict):
                                    maps[name] = {str(k): int(v) for k, v in value.items()}
                                elif isinstance(value, int):
                                    counters[name] = value
                        elif record.what == "dump":
                            _write(summary, maps, counters, attributor, tracer.strlen, directory, publish_to, owner,
                                   timeout, log)
                            maps, counters = {}, {}
        code = os.waitstatus_to_exitcode(tracer.reap())
        if not stopping:
            raise OvlrunError(f"bpftrace exited ({code}: {tracer.failure()}); the watcher stops", status=1)
        return 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        tracer.kill()
        tracer.close()


def _write(summary: dict[str, Any], maps: dict[str, dict[str, int]], counters: dict[str, int],
           attributor: Attributor, strlen: int, directory: str, publish_to: str | None, owner: Owner,
           timeout: float, log: Callable[[str], None]) -> None:
    summaries.add_interval(summary, {k: v for k, v in maps.items() if k in bpftrace.WATCH_MAPS}, counters,
                           attributor, strlen)
    summaries.bound(summary)
    summary["updated"] = time.time()
    summaries.write_local(directory, summary)
    if publish_to:
        try:
            publish(publish_to, owner, summary, timeout)
        except (OvlrunError, OSError) as e:
            log(f"could not publish to {publish_to}: {e}")  # the local summary is written; try again next time
