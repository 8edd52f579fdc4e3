"""The ``learn`` command line: ``learn [OPTIONS] -- CMD``, ``learn watch``, ``learn propose``.

``ovlrun learn ARGS`` (:mod:`ovlrun.cli.commands.learn`) runs the app :func:`app_for`
picks; errors are :class:`OvlrunError`, which the CLI edge prints.  typer through its
public API only (never click).
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Annotated, Any

import typer

from ovlrun.errors import OvlrunError

SUBCOMMANDS = ("watch", "propose")
CONTEXT = {"help_option_names": ["-h", "--help"], "allow_interspersed_args": False}

run_app = typer.Typer(add_completion=False, context_settings=CONTEXT)
sub_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      context_settings={"help_option_names": ["-h", "--help"]})

TreeOpt = Annotated[list[str] | None, typer.Option("--tree", metavar="ROOT[:DEPTH]", help=(
    "A shared tree to attribute lookups to, optionally with the depth of its release directories "
    "(repeatable; default: the trees of --profile, else the site configuration's [[learn_tree]], else those of "
    "the installed profiles)."))]
JsonOpt = Annotated[bool, typer.Option("--json", help="The report as JSON.")]
MinEnoentOpt = Annotated[int, typer.Option("--min-enoent", min=0, metavar="N", help=(
    "Propose a release directory only if at least N of its lookups failed with ENOENT (0: every release "
    "directory a snapshot would answer lookups for)."))]
GlobOpt = Annotated[bool, typer.Option("--glob", help="Collapse two or more sibling releases into one 'parent/*' "
                                       "pattern (a build then localises every sibling).")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", metavar="FILE", help=(
    "Write the proposed profile there (checked as 'ovlrun profile check' does); default: show it in the report."))]


def _open_out(path: str | None) -> IO[str]:
    if path in (None, "-"):
        return sys.stderr
    try:
        return open(path, "w")
    except OSError as e:
        raise OvlrunError(f"cannot write {path}: {e.strerror}") from None


def _write_proposal(text: str, output: str | None) -> None:
    from ovlrun.linux.files import write_atomic

    assert output is not None
    try:
        write_atomic(os.path.abspath(output), text.encode(), 0o644)
    except OSError as e:
        raise OvlrunError(f"cannot write {output}: {e.strerror}") from None


@run_app.command(help="Run CMD under a tracer, count its lookups per release directory of the shared trees, "
                 "and propose a profile.  Exit status: CMD's own; 125 if learn could not run it (bad usage included).")
def learn(command: Annotated[list[str], typer.Argument(metavar="-- CMD [ARGS...]", help="The job.")],
          tree: TreeOpt = None,
          profile: Annotated[str | None, typer.Option("--profile", "-p", help=(
              "Run CMD in this profile's job view (root) and report the residual: lookups still reaching the "
              "shared tree."))] = None,
          tracer: Annotated[str, typer.Option("--tracer", help="auto (bpftrace as root where installed, else "
                                              "strace), bpftrace or strace.")] = "auto",
          user: Annotated[str | None, typer.Option("--user", "-u", help="Run CMD as USER (root only).")] = None,
          output: OutputOpt = None, as_json: JsonOpt = False, glob: GlobOpt = False, min_enoent: MinEnoentOpt = 1,
          inline: Annotated[bool, typer.Option("--inline", help=(
              "Also propose which files to store whole in the snapshots (the profile's inline option): the kinds "
              "of files the job opened below the proposed releases, with the image growth."))] = False,
          inline_max: Annotated[str, typer.Option("--inline-max", metavar="SIZE", help=(
              "With --inline: only files up to SIZE (bytes, or KiB/MiB/GiB)."))] = "256KiB",
          events: Annotated[str | None, typer.Option("--events", metavar="FILE", help=(
              "Write every lookup there, one JSON object a line."))] = None,
          report: Annotated[str | None, typer.Option("--report", metavar="FILE", help=(
              "Write the report there instead of stderr."))] = None) -> int:
    from ovlrun.jobs.nfs import format_lines
    from ovlrun.learn import job, propose
    from ovlrun.learn.inline import propose as propose_inline
    from ovlrun.learn.report import format_table, to_json
    from ovlrun.learn.trees import make_trees
    from ovlrun.learn.view import job_view
    from ovlrun.profile.parse import parse_size
    from ovlrun.profile.patterns import Pattern

    try:
        max_bytes = parse_size(inline_max)
    except ValueError as e:
        raise OvlrunError(f"--inline-max: {e}") from None
    view = job_view(command, profile, user)
    profile_trees: dict[str, list[Pattern]] | None = None
    if view.profile is not None:
        profile_trees = {}
        for t in view.profile.trees:
            profile_trees.setdefault(t.root, []).extend(t.patterns)
    trees = make_trees(tree or [], profile_trees)
    events_file = _open_out(events) if events else None
    try:
        outcome = job.run(job.Request(command, trees, tracer, profile, user, events_file, _map_keys()), view.prepare,
                          view.run, mountinfo_of_job=view.own_namespace, warn=_warn)
    finally:
        if events_file is not None:
            events_file.close()
    if outcome.job_id:
        _record_learned(outcome)
    tally = outcome.tally
    candidates = [propose.Candidate(root, rel, c.lookups, c.enoent, c.opens)
                  for (root, rel), c in tally.releases.items()]
    chosen = propose.choose(candidates, trees, min_enoent=min_enoent, glob=glob)
    inlined = (propose_inline(tally, [(c.root, c.pattern) for c in chosen.chosen], max_bytes)
               if inline and chosen.chosen else [])
    text = propose.render(chosen, f"proposed by ovlrun learn from: {' '.join(command)}"[:200],
                          f"{outcome.tracer} tracing {' '.join(command)!r}"[:300], inlined) if chosen.chosen else ""
    if text:
        propose.check(text, output or "<proposal>")
        if output:
            _write_proposal(text, output)
    out = _open_out(report)
    try:
        if as_json:
            data: dict[str, Any] = {"command": command, "status": outcome.status, "tracer": outcome.tracer,
                                    "job_id": outcome.job_id or None,
                                    "complete": outcome.complete, "notes": outcome.notes, **to_json(tally),
                                    "nfs": outcome.nfs,
                                    "proposal": {"file": output, "patterns": [c._asdict() for c in chosen.chosen],
                                                 "skipped": chosen.skipped, "text": text,
                                                 "inline": [p.to_json() for p in inlined]}}
            out.write(json.dumps(data, indent=1) + "\n")
        else:
            header = (f"ovlrun learn: {' '.join(command)[:80]} exited with {outcome.status}; "
                      f"{tally.total.lookups:,} lookups by {tally.processes:,} processes, traced by {outcome.tracer}")
            out.write(format_table(tally, header) + "\n")
            for line in format_lines(outcome.nfs):
                out.write(line + "\n")
            for note in outcome.notes:
                out.write(f"ovlrun learn: warning: {note}\n")
            for p in inlined:
                out.write(p.describe() + "\n")
            if inline and chosen.chosen and not inlined:
                out.write("nothing to inline: the job opened no file with an extension of at most "
                          f"{inline_max} below the proposed releases\n")
            if not text:
                out.write(f"nothing to propose: no release directory had {min_enoent} or more ENOENT lookups\n")
            elif output:
                out.write(f"proposed profile written to {output} ({len(chosen.chosen)} patterns)\n")
            else:
                out.write("proposed profile (--output FILE writes it):\n" + text)
    finally:
        if out is not sys.stderr:
            out.close()
    return outcome.status


def _record_learned(outcome: Any) -> None:
    """learn --profile ran the job as a launch: its record gets what learn saw, and its end."""
    from ovlrun.jobs import history
    from ovlrun.learn.report import job_figures

    figures: dict[str, object] = {"tracer": outcome.tracer, "complete": outcome.complete,
                                  **job_figures(outcome.tally)}

    def change(record: Any) -> None:
        record.stats["learned"] = figures
        if outcome.nfs is not None:
            record.stats["nfs"] = outcome.nfs

    try:
        history.finish(outcome.job_id, change)
    except (OSError, ValueError, OvlrunError) as e:
        _warn(f"the job record {outcome.job_id} could not take learn's figures: {e}")


@sub_app.command("watch", help="Count lookups under the trees across all jobs of this node (bpftrace, root) and "
                 "write the node's summary every interval.  Runs until stopped (SIGTERM).")
def watch_command(tree: TreeOpt = None,
                  interval: Annotated[int, typer.Option("--interval", min=1, metavar="SECONDS", help=(
                      "Write the summary this often."))] = 300,
                  directory: Annotated[str, typer.Option("--dir", metavar="DIR", help=(
                      "Where this node's summary (NODE.json) is kept."))] = "",
                  publish: Annotated[str | None, typer.Option("--publish", metavar="DIR", help=(
                      "Also copy it into this shared directory, as the site's image_owner."))] = None) -> int:
    from ovlrun.learn import summaries
    from ovlrun.learn.trees import make_trees
    from ovlrun.learn.watch import watch
    from ovlrun.store.siteconfig import load_site_config

    owner = load_site_config().image_owner
    return watch(make_trees(tree or []), interval=interval, directory=directory or _state_dir(summaries.DEFAULT_DIR),
                 publish_to=publish, owner=owner)


def _state_dir(default: str) -> str:
    override = os.environ.get("OVLRUN_LEARN_DIR")
    if override and os.geteuid() == 0 and not os.environ.get("SUDO_UID", "0").strip("0"):
        return override
    return default


@sub_app.command("propose", help="Merge node summaries (this node's, or those published in --from DIR) into a "
                 "proposed profile, ranked by the lookups a snapshot would answer.")
def propose_command(from_: Annotated[str | None, typer.Option("--from", metavar="DIR", help=(
                        "A shared directory where nodes publish their summaries (learn watch --publish)."))] = None,
                    tree: TreeOpt = None, min_enoent: MinEnoentOpt = 1, glob: GlobOpt = False,
                    output: OutputOpt = None, as_json: JsonOpt = False) -> int:
    from ovlrun.learn import propose, summaries
    from ovlrun.learn.trees import make_trees
    from ovlrun.store.siteconfig import load_site_config

    if from_ is not None:
        from ovlrun.store.bounded import run_bounded

        owner = load_site_config().image_owner
        found = run_bounded(lambda: summaries.read_dir(from_, owner), timeout=300, what=f"reading {from_}")
    else:
        found = [summaries.read_local(os.path.join(_state_dir(summaries.DEFAULT_DIR),
                                                   f"{summaries.node_name()}.json"))]
    totals = summaries.totals(found)
    trees = make_trees(tree or sorted({root for root, _ in totals}))
    known = {t.root for t in trees}
    candidates = [propose.Candidate(root, rel, c.lookups, c.enoent, c.opens)
                  for (root, rel), c in totals.items() if root in known]
    chosen = propose.choose(candidates, trees, min_enoent=min_enoent, glob=glob)
    nodes = ", ".join(sorted(str(s["node"]) for s in found))
    if not chosen.chosen:
        raise OvlrunError(f"nothing to propose from {len(found)} summaries ({nodes}): no release directory had "
                          f"{min_enoent} or more ENOENT lookups", status=1)
    text = propose.render(chosen, f"proposed by ovlrun learn propose from {len(found)} nodes",
                          f"the summaries of {nodes}"[:300])
    propose.check(text, output or "<proposal>")
    if output:
        _write_proposal(text, output)
    if as_json:
        print(json.dumps({"nodes": len(found), "patterns": [c._asdict() for c in chosen.chosen],
                          "skipped": chosen.skipped, "file": output, "text": text}, indent=1))
    elif not output:
        print(text, end="")
    else:
        print(f"proposed profile written to {output} ({len(chosen.chosen)} patterns from {len(found)} nodes)")
    return 0


def _map_keys() -> int:
    """bpftrace's map size: OVLRUN_LEARN_MAP_KEYS makes it smaller (tests: a full map is counted)."""
    from ovlrun.learn.bpftrace import MAP_KEYS

    value = os.environ.get("OVLRUN_LEARN_MAP_KEYS", "")
    return int(value) if value.isdigit() and int(value) > 0 else MAP_KEYS


def _warn(message: str) -> None:
    print(f"ovlrun learn: {message}", file=sys.stderr)


def app_for(argv: list[str]) -> tuple[typer.Typer, bool]:
    """The typer app for ``learn ARGS`` and whether it is a wrapper (learn itself: its
    usage errors are 125, CMD's status is CMD's; ``watch`` and ``propose``: 2)."""
    if argv and argv[0] in SUBCOMMANDS:
        return sub_app, False
    return run_app, True
