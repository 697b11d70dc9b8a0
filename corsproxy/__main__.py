"""``python -m corsproxy``: the same program as the ``corsproxy`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
