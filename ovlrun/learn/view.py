"""What the job's first process does before CMD: the launch's steps, in learn's gate.

With ``--profile NAME`` (root) the gate's child builds the job's view exactly as a launch
does: the plan from the profile and the store's index (never the shared tree), a
private mount namespace, the profile's overlays (:func:`ovlrun.launch.mount.mount_items`,
trust checks included), then the verified privilege drop
(:func:`ovlrun.linux.privileges.drop_to`) and, after the gate, the launch's own exec
(:func:`ovlrun.launch.execute.exec_job`: working directory and PATH search with the
job's rights).  Users get the same view the other way round, through sudo, with learn
inside the job: ``sudo ovlrun --profile NAME -- ovlrun learn -- CMD`` (strace, their own
rights); learn then finds the localised paths in its own mount table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from ovlrun.errors import OvlrunError
from ovlrun.launch.execute import current_directory, exec_job
from ovlrun.launch.mount import TreeRootMissing, mount_items, report_missing, warn_stderr
from ovlrun.launch.plan import JobPlan
from ovlrun.linux.namespaces import enter_private_namespace
from ovlrun.linux.privileges import Identity, drop_to
from ovlrun.profile.parse import Profile


class JobView(NamedTuple):
    prepare: Callable[[], None]  # in the gate's child, before the tracer attaches
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
    env = dict(os.environ)
    if identity is not None:
        env.setdefault("HOME", identity.home)
    cwd = current_directory()
    plan: JobPlan | None = None
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
        env["OVLRUN_PROFILE"] = plan.name

    def prepare() -> None:
        if plan is not None:
            report_missing(plan, strict=False, warn=warn_stderr)
            enter_private_namespace()
            try:
                mount_items(plan.items, store, strict=False, warn=warn_stderr, missing_root=plan.missing_root)
            except TreeRootMissing as e:
                raise OvlrunError(f"{e}; refusing to run the job there") from None
        if identity is not None:
            drop_to(identity)

    def run() -> int:
        return exec_job(command, env, None, cwd)

    return JobView(prepare, run, plan is not None, profile)
