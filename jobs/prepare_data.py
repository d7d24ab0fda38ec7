"""`biglearn prepare` as a script, for `ray job submit --working-dir . -- python jobs/prepare_data.py ...`:
the same options (`python jobs/prepare_data.py --help`)."""

import sys

from biglearn.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
