"""``python -m ralmspec ...``: the ``ralmspec`` command (``ralmspec.cli.main``, its exit status
included), for an environment whose scripts folder is not on the PATH."""

import sys

from ralmspec.cli import main

sys.exit(main())
