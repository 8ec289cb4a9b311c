"""``python -m bdia_pam``: the ``bdia-pam`` command (:mod:`bdia_pam._entry`)."""
import sys

from ._entry import main

if __name__ == "__main__":
    sys.exit(main())
