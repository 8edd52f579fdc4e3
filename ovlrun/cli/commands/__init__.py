"""The command table: every subcommand of ``ovlrun`` (everything but the launch), one
module each in this folder.

From this one table come the sudo gate (:func:`ovlrun.cli.main.sudo_gate`), the
"Other commands" of ``ovlrun --help`` and the typer registrations
(:mod:`ovlrun.cli.app`).  Adding a command is one entry here and one module
``ovlrun/cli/commands/NAME.py`` with ``register(app, name) -> list[str]`` (registers
its typer command or group under ``name``; returns the group's subcommand names, empty
for a single command).

Plain data, no typer: ``cli.main`` reads it to decide what a command line is.
"""

from __future__ import annotations

# Who may run a command through sudo as root (the shipped sudoers drop-in agrees: it
# grants launches and `enter` only).
SUDO_ALLOWED = "allowed"  # the caller's own job, run as the caller
SUDO_AS_YOURSELF = "as yourself"  # needs no root: run it without sudo
SUDO_ROOT_ONLY = "root only"  # the administrator's (or slurmd's)


class Command:
    """One entry of the table."""

    __slots__ = ("arguments", "name", "sudo", "sudo_hint", "summary", "wrapper")

    def __init__(self, name: str, sudo: str, summary: str, arguments: str = "", *, wrapper: bool = False,
                 sudo_hint: str = "") -> None:
        self.name = name  # also its module: ovlrun.cli.commands.NAME
        self.sudo = sudo  # SUDO_ALLOWED, SUDO_AS_YOURSELF or SUDO_ROOT_ONLY
        self.summary = summary  # for ovlrun --help
        self.arguments = arguments  # after the (sub)command, for ovlrun --help
        # A wrapper like the launch and env(1): its own usage errors exit 125, not 2.
        self.wrapper = wrapper
        self.sudo_hint = sudo_hint  # added to the sudo gate's refusal

    @property
    def module(self) -> str:
        return f"{__name__}.{self.name}"


COMMANDS = (
    Command("snapshot", SUDO_ROOT_ONLY, "manage the snapshot store (root)"),
    Command("profile", SUDO_AS_YOURSELF, "validate a profile (submit-time check)", "NAME"),
    Command("doctor", SUDO_ROOT_ONLY, "what the kernel supports, how ovlrun mounts"),
    Command("status", SUDO_AS_YOURSELF, "inside a job: what is localised"),
    Command("enter", SUDO_ALLOWED, "join the namespace a prolog prepared (sudo)", "JOBID [-- CMD]", wrapper=True),
    Command("slurm", SUDO_ROOT_ONLY, "Slurm hooks (see docs/slurm.md)"),
    Command("learn", SUDO_AS_YOURSELF, "trace a job's lookups, propose a profile", "[OPTIONS] -- CMD | watch | propose",
            wrapper=True, sudo_hint="in a profile's view: sudo ovlrun --profile NAME -- ovlrun learn -- CMD"),
    Command("jobs", SUDO_ROOT_ONLY, "recent jobs: what each was given and saved (root)",
            "[--json] [--limit N]"),
)


def find(name: str) -> Command | None:
    return next((c for c in COMMANDS if c.name == name), None)
