"""``python -m bdia_pam``: the ``bdia-pam`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
