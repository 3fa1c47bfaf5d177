"""The errors a user can cause (as opposed to bugs): the CLI reports them in one line."""

from coordinator.dashboard import DashboardError
from coordinator.ledger import LedgerError
from coordinator.server import ServeError
from node.checkpoint import CheckpointError
from node.coordinator_client import CoordinatorError
from node.join import SwarmStalled
from node.models import ModelLoadError
from node.swarm.dht import SwarmJoinError
from protocol.config import ConfigError
from protocol.identity import IdentityError
from protocol.tasks import TaskError

EXPECTED_ERRORS = (ConfigError, ModelLoadError, TaskError, CheckpointError, SwarmJoinError, SwarmStalled,
                   IdentityError, LedgerError, CoordinatorError, ServeError, DashboardError)
