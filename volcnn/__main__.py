"""``python -m volcnn`` runs the ``volcnn`` command."""

import sys

from volcnn.cli import main

sys.exit(main())
