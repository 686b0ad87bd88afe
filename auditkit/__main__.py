"""``python -m auditkit`` is the ``auditkit`` command."""

import sys

from auditkit.cli import main

sys.exit(main())
