"""`python -m biglearn`: the same as the `biglearn` command."""

import sys

from biglearn.cli import main

sys.exit(main())
