"""``python -m coremap`` is the ``coremap`` command."""
import sys

from coremap._cli import main

sys.exit(main())
