"""`python -m trainer`: the container's entrypoint."""

import sys

from trainer.runtime import set_tensorflow_env

set_tensorflow_env()

from trainer.cli import main  # noqa: E402

sys.exit(main())
