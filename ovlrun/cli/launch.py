"""The launch command line: ``ovlrun --profile NAME [--user U] [--strict] [--login] [--] [CMD...]``.

Parsed by hand: importing typer costs more than the whole rest of a launch, and launch
overhead is what every job pays.  Everything the job path needs is imported here, as
root, before anything is mounted or dropped.
"""

from __future__ import annotations

from ovlrun.errors import OvlrunError

LAUNCH_USAGE = "ovlrun --profile NAME [--user USER] [--strict] [--login] [--] [CMD [ARGS...]]"
# The launch's part of `ovlrun --help`; the other commands' lines come from the command
# table (ovlrun/cli/app.py: help_text).
LAUNCH_HELP = """\
Run CMD (or, with none, your shell) in a private mount namespace where the release
paths the profile localises are served from local metadata snapshots: lookups there,
including the failing ones of long PATH/LD_LIBRARY_PATH/PYTHONPATH searches, never
reach the shared (NFS) tree, while file data still comes from it.  Everything else is the
plain shared tree.  Nothing is mounted on the host.

Must run as root (sudo, a scheduler prolog); under sudo the command runs as the calling
user with no capabilities, in the caller's environment.  Exit status, as env(1): CMD's
own, or 125 (ovlrun failed, bad usage included), 126 (CMD not executable), 127 (CMD not
found).

Options:
  -p, --profile NAME  profile name (or, for root, a path to a .toml file)
  -u, --user USER     run as USER (root callers only, e.g. prologs)
  --strict            fail if a localised path cannot be localised
  --login             with no CMD: start the shell as a login shell (re-reads
                      /etc/profile, which may reset PATH); default: $SHELL, non-login
"""


class LaunchArgs:
    """A parsed launch command line."""

    __slots__ = ("command", "login", "profile", "strict", "user")

    def __init__(self, profile: str, user: str | None, strict: bool, login: bool, command: list[str]) -> None:
        self.profile = profile
        self.user = user
        self.strict = strict
        self.login = login
        self.command = command

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LaunchArgs) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return "LaunchArgs(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def _usage(message: str) -> OvlrunError:
    # 125, as env(1) and chroot(1) exit for their own usage errors: a wrapper's caller
    # can then tell "the wrapper failed" (125) from anything the command returns.
    return OvlrunError(f"{message} (see ovlrun --help)")


def parse_launch(argv: list[str]) -> LaunchArgs:
    """Parse ``--profile P [--user U] [--strict] [--login] [--] CMD...``; options end at CMD."""
    profile: str | None = None
    user: str | None = None
    strict = login = False
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
                    raise _usage(f"option {name} needs a value")
                value = argv[i]
            if name in ("--profile", "-p"):
                profile = value
            else:
                user = value
        elif arg == "--strict":
            strict = True
        elif arg == "--login":
            login = True
        else:
            raise _usage(f"unknown option {arg!r}")
        i += 1
    if profile is None:
        raise _usage("missing --profile NAME")
    return LaunchArgs(profile, user, strict, login, argv[i:])


def launch(argv: list[str]) -> int:
    import os

    args = parse_launch(argv)
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
    from ovlrun.profile.locate import open_profile
    from ovlrun.store.layout import store_dir

    own_env = dict(os.environ)
    caller = resolve_caller(own_env, args.profile, args.user, warn_stderr)
    # Opened once: trust-checked (sudo callers), cache key and parse, all on this fd.
    profile = open_profile(args.profile, trusted_only=caller.is_sudo)
    store = store_dir(own_env)
    try:
        plan = load_cached(profile, store)
        if plan is None:
            from ovlrun.launch.planner import plan_job

            # A sudo caller who may not read the profile does not get its content quoted.
            private = caller.is_sudo and caller.identity is not None and not caller.identity.may_read(profile.st)
            plan = plan_job(profile, store, private=private)
    finally:
        profile.close()
    # $SHELL is the user's own unless --user picked someone else from a root environment.
    return execute.run(plan, args.command, store=store, identity=caller.identity, strict=args.strict,
                       environ=caller.job_env, login=args.login, env_shell=args.user is None)
