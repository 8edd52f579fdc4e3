import sys

from ovlrun.cli.main import main

sys.exit(main())
