"""`python -m keras_progdist.export --workdir ... --export_dir ...` (see `cli.main`)."""

import sys

from keras_progdist.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
