"""``python -m cli``: the same as the ``grpo-swarm`` console script."""

import sys

from cli.main import main

sys.exit(main())
