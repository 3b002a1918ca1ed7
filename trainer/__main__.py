"""`python -m trainer`: the container's entrypoint."""

import sys

from trainer.cli import main

sys.exit(main())
