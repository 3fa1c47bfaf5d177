"""The run config (sections of checked pydantic models) and its one-line errors.

``load_config(path, overrides)`` reads a TOML file and ``section.key=value`` overrides; ``RunConfig`` can
also be built in Python. Either way a bad value raises ``ConfigError`` naming the field.
"""

from protocol.config.checked import Checked, ConfigError
from protocol.config.run import MIN_BINDING_TOLERANCE, RunConfig, load_config, parse_override
from protocol.config.sections import (
                                      CheckpointSection,
                                      EvalSection,
                                      GRPOSection,
                                      ModelSection,
                                      OptimSection,
                                      RolloutSection,
                                      RunSection,
                                      SwarmSection,
                                      TaskSection,
                                      TrustSection,
                                      WarmStartSection,
)

__all__ = ["Checked", "CheckpointSection", "ConfigError", "EvalSection", "GRPOSection", "MIN_BINDING_TOLERANCE",
           "ModelSection", "OptimSection", "RolloutSection", "RunConfig", "RunSection", "SwarmSection",
           "TaskSection", "TrustSection", "WarmStartSection", "load_config", "parse_override"]
