"""`biglearn serve` as a script, for `ray job submit --working-dir . -- python jobs/serve_model.py ...`:
the same options (`python jobs/serve_model.py --help`)."""

import sys

from biglearn.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
