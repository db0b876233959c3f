"""`python -m volconv.cli`: the `volconv` command, as `python -m volconv` runs it."""
import sys

from . import main

sys.exit(main())
