"""``python -m benches [--quick]``: see benches/cli.py."""

import sys

from benches.cli import main

sys.exit(main())
