"""`biglearn pretrain` as a script, for `ray job submit --working-dir . -- python jobs/pretrain.py ...`:
the same options (`python jobs/pretrain.py --help`)."""

import sys

from biglearn.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
