"""The launch command line: ``ovlrun --profile NAME [--user U] [--strict] [--] [CMD...]``.

Parsed by hand: importing typer costs more than the whole rest of a launch, and launch
overhead is what every job pays.  Everything the job path needs is imported here, as
root, before anything is mounted or dropped.
"""

from __future__ import annotations

from ovlrun.errors import OvlrunError

LAUNCH_HELP = """\
Run CMD (or, with none, your login shell) in a private mount namespace where the release
paths the profile localises are served from local metadata snapshots: lookups there,
including the failing ones of long PATH/LD_LIBRARY_PATH/PYTHONPATH searches, never
reach the shared (NFS) tree, while file data still comes from it.  Everything else is the
plain shared tree.  Nothing is mounted on the host.

Must run as root (sudo, a scheduler prolog); under sudo the command runs as the calling
user with no capabilities.  Exit status: CMD's own, or 125 (ovlrun failed), 126 (CMD not
executable), 127 (CMD not found).

Other commands (see ovlrun COMMAND --help):
  snapshot build|list|verify|refresh|gc   manage the snapshot store (root)
  profile check NAME                      validate a profile (submit-time check)
  doctor                                  what the kernel supports, how ovlrun mounts
  status                                  inside a job: what is localised
  enter JOBID [-- CMD]                    join the namespace a prolog prepared (sudo)
  slurm prolog|epilog|clone-ns            Slurm hooks (see docs/slurm.md)
Environment: OVLRUN_PROFILE_PATH (profile directories, colon-separated),
OVLRUN_STORE (snapshot store, default /var/lib/ovlrun).
"""



def parse_launch(argv: list[str]) -> tuple[str, str | None, bool, list[str]]:
    """Parse ``--profile P [--user U] [--strict] [--] CMD...``; options end at CMD."""
    profile: str | None = None
    user: str | None = None
    strict = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.partition("=")
        if name in ("--profile", "-p", "--user", "-u"):
            if not eq:
                i += 1
                if i >= len(argv):
                    raise OvlrunError(f"option {name} needs a value")
                value = argv[i]
            if name in ("--profile", "-p"):
                profile = value
            else:
                user = value
        elif arg == "--strict":
            strict = True
        else:
            raise OvlrunError(f"unknown option {arg!r} (see ovlrun --help)")
        i += 1
    if profile is None:
        raise OvlrunError("missing --profile NAME (see ovlrun --help)")
    return profile, user, strict, argv[i:]


def launch(argv: list[str]) -> int:
    import os

    profile_spec, user, strict, command = parse_launch(argv)
    # The one root check of a launch (execute.run trusts its caller).
    if os.geteuid() != 0:
        raise OvlrunError("ovlrun must run as root: use 'sudo ovlrun ...', a scheduler prolog, or a root shell")
    # Everything the job path needs is imported here, as root, before the drop: after it
    # the interpreter's own directories may be unreadable to the user.  Only light
    # modules: the planner (tomllib, json, ...) is imported on a plan-cache miss only.
    from ovlrun.launch import execute
    from ovlrun.launch.caller import resolve_caller
    from ovlrun.launch.mount import warn_stderr
    from ovlrun.launch.plancache import load_cached
    from ovlrun.profile.locate import locate_profile
    from ovlrun.store.layout import store_dir

    own_env = dict(os.environ)
    caller = resolve_caller(own_env, profile_spec, user, warn_stderr)
    profile_file = locate_profile(profile_spec, trusted_only=caller.is_sudo)
    store = store_dir(own_env)
    plan = load_cached(profile_file, store)
    if plan is None:
        from ovlrun.launch.planner import plan_job

        plan = plan_job(profile_file, store)
    return execute.run(plan, command, store=store, identity=caller.identity, strict=strict, environ=caller.job_env)
