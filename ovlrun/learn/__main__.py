"""``python -m ovlrun.learn ...``: learn's command line on its own, with the CLI edge's
error handling (one line, never a traceback, the error's exit status)."""

import sys

from ovlrun.errors import OvlrunError
from ovlrun.learn.cli import main

try:
    status = main(sys.argv[1:], prog="ovlrun learn")
    sys.stdout.flush()
except OvlrunError as e:
    print(f"ovlrun: {e.message}", file=sys.stderr)
    status = e.status
except KeyboardInterrupt:
    status = 130
sys.exit(status)
