"""What the job's first process does before CMD: the launch's steps, in learn's gate.

With ``--profile NAME`` (root) the gate's child builds the job's view exactly as a launch
does (:func:`ovlrun.launch.execute.prepare`: the plan from the profile and the store's
index, never the shared tree; a private mount namespace with the profile's overlays,
trust checks included; the launch's job record), then, once the caller's resource
limits are back, the verified privilege drop (:func:`ovlrun.linux.privileges.drop_to`)
and, after the gate, the launch's own exec (:func:`ovlrun.launch.execute.exec_job`:
working directory and PATH search with the job's rights).  Users get the same view the
other way round, through sudo, with learn inside the job: ``sudo ovlrun --profile NAME
-- ovlrun learn -- CMD`` (strace, their own rights); learn then finds the localised paths
in its own mount table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from ovlrun.errors import OvlrunError
from ovlrun.launch import execute
from ovlrun.linux import limits
from ovlrun.linux.privileges import Identity, drop_to
from ovlrun.profile.parse import Profile


class JobView(NamedTuple):
    prepare: Callable[[], str]  # in the gate's child, before the tracer attaches: the job record's id ("": none)
    run: Callable[[], int]  # in the gate's child, after: exec CMD (returns only if that failed)
    own_namespace: bool  # the job has a mount table of its own (read the localised paths there)
    profile: Profile | None


def job_view(command: list[str], profile_spec: str | None, user: str | None) -> JobView:
    """The gate's work for this request; everything root reads (profile, store index,
    password database) is read here, before anything is mounted."""
    is_root = os.geteuid() == 0
    if user is not None and not is_root:
        raise OvlrunError("--user is only for root; learn runs the job as you")
    if os.environ.get("SUDO_UID", "0").strip("0") and is_root:
        raise OvlrunError("learn is not available through sudo; run it as yourself (strace) or, to learn inside "
                          "a profile's view, as: sudo ovlrun --profile NAME -- ovlrun learn -- CMD")
    if profile_spec is not None and not is_root:
        raise OvlrunError(f"--profile needs root to mount the profile's view; as a user run: sudo ovlrun "
                          f"--profile {profile_spec} -- ovlrun learn [OPTIONS] -- CMD")
    identity = Identity.of_name(user) if user is not None else None
    if identity is not None and identity.uid == 0:
        identity = None
    argv, env, cwd = command, dict(os.environ), execute.current_directory()
    plan = None
    profile: Profile | None = None
    store = ""
    if profile_spec is not None:
        from ovlrun.launch.planner import plan as make_plan
        from ovlrun.profile.parse import load_profile
        from ovlrun.store.index import Store
        from ovlrun.store.layout import store_dir

        profile = load_profile(profile_spec)
        store = store_dir()
        plan = make_plan(profile, Store.open(store))

    def prepare() -> str:
        nonlocal argv, env, cwd
        if plan is not None:
            argv, env, cwd = execute.prepare(plan, command, store=store, identity=identity, strict=False, environ=env)
        limits.restore()  # as the launch's exec does: the caller's limits, before the drop
        if identity is not None:
            env.setdefault("HOME", identity.home)
            drop_to(identity)
        return env.get("OVLRUN_JOB_ID", "") if plan is not None else ""

    def run() -> int:
        return execute.exec_job(argv, env, None, cwd)

    return JobView(prepare, run, plan is not None, profile)
