"""`biglearn sweep` as a script, for `ray job submit --working-dir . -- python jobs/sweep.py ...`:
the same options (`python jobs/sweep.py --help`)."""

import sys

from biglearn.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
