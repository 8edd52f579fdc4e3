import sys

from ovlrun.cli import main

sys.exit(main())
