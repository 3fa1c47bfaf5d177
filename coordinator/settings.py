"""The coordinator's own settings (its command-line flags), apart from the run config it serves."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field

from node.swarm.dht import DHTSettings
from protocol.config import Checked


class CoordinatorSettings(Checked):
    """Where the coordinator keeps its files, where it listens, and whom it trusts."""

    field_prefix = "--"
    model_config = Checked.model_config | {"strict": False}  # paths come as strings from the command line

    out: Path
    """Folder for its key, libp2p identity, ledger and checkpoints (reuse it to restart)."""
    bind: str = "0.0.0.0"
    """Address the gRPC API and the dashboard listen on."""
    grpc_port: int = Field(50051, ge=0, le=65535)
    """gRPC API port (0: any free port)."""
    http_port: int = Field(8080, ge=0, le=65535)
    """Dashboard port (0: any free port)."""
    public_address: Optional[str] = None
    """gRPC address nodes dial (HOST:PORT); none: the announced or bound host, the gRPC port."""
    dht: DHTSettings = Field(default_factory=DHTSettings)
    """Where the bootstrap DHT listens and who it is (default identity: OUT/p2p.id)."""
    key: Optional[Path] = None
    """The coordinator's Ed25519 key; none: OUT/coordinator.pem, created."""
    admin_key: Optional[Path] = None
    """Public key file (keygen's .pub) allowed to ban and unban; none: the coordinator's own key."""
    verifier_keys: Optional[Path] = None
    """Public keys (one per line) allowed to register as verifiers; none: any key."""
    token_lifetime: Optional[float] = Field(None, gt=0)
    """Seconds an access token is valid; none: the run's trust.token_lifetime."""
    renew_grace: float = Field(600.0, ge=0)
    """Seconds after expiry that a token may still be renewed (a coordinator outage)."""
