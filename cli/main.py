"""``grpo-swarm`` entry point: parse the command line, run the command, report expected errors in one line.

Expected failures (bad config or flags, unknown model, missing data set, corrupt checkpoint, a swarm that
cannot be joined) print one ``error:`` line and exit 2; a traceback means a bug.
"""

from __future__ import annotations

import os
import sys

EXIT_USAGE = 2


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors a user can cause, as opposed to bugs (imported here: each pulls in its role's stack)."""
    from coordinator.dashboard.server import DashboardError
    from coordinator.ledger import LedgerError
    from coordinator.server import ServeError
    from node.peer.coordinator_client import CoordinatorError
    from node.peer.run import SwarmStalled
    from node.swarm.dht import SwarmJoinError
    from node.train.checkpoint import CheckpointError
    from node.train.models import ModelLoadError
    from protocol.config import ConfigError
    from protocol.identity import IdentityError
    from protocol.tasks import TaskError

    return (ConfigError, ModelLoadError, TaskError, CheckpointError, SwarmJoinError, SwarmStalled, IdentityError,
            LedgerError, CoordinatorError, ServeError, DashboardError)


def main(argv: list[str] | None = None) -> int:
    from cli.parser import build_parser

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    errors = expected_errors()
    try:
        status = args.func(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
