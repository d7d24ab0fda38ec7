"""`biglearn simulate` as a script, for `ray job submit --working-dir . -- python jobs/simulate_gmm.py ...`:
the same options (`python jobs/simulate_gmm.py --help`)."""

import sys

from biglearn.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", *sys.argv[1:]]))
