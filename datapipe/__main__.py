"""``python -m datapipe``: the same as the ``datapipe`` command."""

import sys

from datapipe.cli import main

sys.exit(main())
