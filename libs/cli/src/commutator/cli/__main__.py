"""``python -m commutator.cli``."""

import sys

from commutator.cli.main import main

sys.exit(main())
