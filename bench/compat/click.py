# Bench-only shim: the base worktree (84ea65c) imports `click`, which typer 0.28 vendors
# as typer._click.  Alias it so the "before" side runs with the same venv.
import sys
import typer._click as _click
import typer._click.exceptions  # noqa: F401
sys.modules["click"] = _click
