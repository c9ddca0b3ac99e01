import sys

from pypop.cli import main

sys.exit(main())
