"""Command line.

Two shapes share one program:
- ``ovlrun --profile NAME [--user U] [--strict] [--] [CMD ARGS...]`` launches a job;
- ``ovlrun SUBCOMMAND ...`` (snapshot, doctor, profile, ...) administers.

The launch path is parsed by hand: importing typer/click costs ~30 ms, more than the
whole rest of a launch, and launch overhead is what every job pays.  ``--help`` and all
subcommands go through typer.  :class:`OvlrunError` is caught here and only here.
"""

from __future__ import annotations

import sys

from ovlrun.errors import EXIT_OVLRUN, OvlrunError

SUBCOMMANDS = ("snapshot", "doctor", "profile", "status", "slurm", "enter")
HELP_FLAGS = ("-h", "--help", "--version")

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


class UsageError(OvlrunError):
    pass


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
                    raise UsageError(f"option {name} needs a value")
                value = argv[i]
            if name in ("--profile", "-p"):
                profile = value
            else:
                user = value
        elif arg == "--strict":
            strict = True
        else:
            raise UsageError(f"unknown option {arg!r} (see ovlrun --help)")
        i += 1
    if profile is None:
        raise UsageError("missing --profile NAME (see ovlrun --help)")
    return profile, user, strict, argv[i:]


def launch(argv: list[str]) -> int:
    import os

    profile_spec, user, strict, command = parse_launch(argv)
    if os.geteuid() != 0:
        raise OvlrunError("ovlrun must run as root: use 'sudo ovlrun ...', a scheduler prolog, or a root shell")
    # Everything the job path needs is imported here, as root, before the drop: after it
    # the interpreter's own directories may be unreadable to the user.  Only light
    # modules: the planner (ovlrun.launch.planner: tomllib, json, ...) is imported on a plan-cache
    # miss only.
    from ovlrun.launch import execute
    from ovlrun.launch.caller import caller_environment, check_caller_request, refuse_tainted_environment
    from ovlrun.launch.plan import load_cached
    from ovlrun.linux.privileges import sudo_caller, target_identity
    from ovlrun.profile.locate import locate_profile
    from ovlrun.store.layout import store_dir

    own_env = dict(os.environ)
    job_env = own_env
    caller = sudo_caller(own_env)
    if caller is not None:
        refuse_tainted_environment(own_env)
        check_caller_request(own_env, profile_spec)
        from_sudo = caller_environment(caller)
        if from_sudo is None:
            execute.warn_stderr("could not read your environment from the calling sudo process; "
                            "the job gets the environment sudo gave ovlrun")
        else:
            job_env = from_sudo
    profile_file = locate_profile(profile_spec, trusted_only=caller is not None)
    store = store_dir(own_env)
    plan = load_cached(profile_file, store)
    if plan is None:
        from ovlrun.launch.planner import plan_job

        plan = plan_job(profile_file, store)
    identity = target_identity(user, own_env)
    return execute.run(plan, command, store=store, identity=identity, strict=strict, environ=job_env)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in ("slurm", "enter"):
            # Slurm hooks and `enter` parse their own argv: no typer import in a Prolog,
            # and `enter JOBID -- CMD...` passes CMD's options through untouched.
            if args[0] == "slurm":
                from ovlrun.hooks.slurm import main as slurm_main

                return slurm_main(args[1:])
            from ovlrun.hooks.enter import main as enter_main

            return enter_main(args[1:])
        if args and (args[0] in SUBCOMMANDS or args[0] in HELP_FLAGS):
            from ovlrun.cli.admin import run_typer

            return run_typer(args)
        return launch(args)
    except OvlrunError as e:
        print(f"ovlrun: {e.message}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OVLRUN


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
