"""``python -m legolm``: the ``legolm`` command."""

import sys

from legolm.cli.main import main

sys.exit(main())
