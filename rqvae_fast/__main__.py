"""``python -m rqvae_fast`` runs the ``rqvae-fast`` command line."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
