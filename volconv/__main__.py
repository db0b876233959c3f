"""`python -m volconv`: the `volconv` command."""
import sys

from .cli import main

sys.exit(main())
