"""The errors a user can cause (as opposed to bugs): the CLI reports them in one line."""

from node.checkpoint import CheckpointError
from node.join import SwarmStalled
from node.models import ModelLoadError
from node.swarm.dht import SwarmJoinError
from protocol.config import ConfigError
from protocol.tasks import TaskError

EXPECTED_ERRORS = (ConfigError, ModelLoadError, TaskError, CheckpointError, SwarmJoinError, SwarmStalled)
