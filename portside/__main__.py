"""`python -m portside` is the `portside` command."""

import sys

from portside.cli import main

sys.exit(main())
