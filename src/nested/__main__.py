"""``python -m nested ...``: the ``nested`` command, for environments where its console script is not on PATH."""

import sys

from nested.cli import main

sys.exit(main())
