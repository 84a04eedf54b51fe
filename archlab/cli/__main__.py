"""`python -m archlab.cli ...`: the same as the `archlab` command."""

import sys

from archlab.cli import main

sys.exit(main())
