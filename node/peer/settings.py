"""A node's or verifier's own settings (its command-line flags), apart from the run config it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator

from node.swarm.dht import DHTSettings
from protocol.config import Checked


class PeerSettings(Checked):
    """How this process joins a swarm, and where it keeps its files."""

    field_prefix = "--"

    out: Path
    """Folder for metrics, logs, verdicts and (in an admitted run) the libp2p identity."""
    coordinator: Optional[str] = None
    """An admitted run's coordinator (HOST:PORT): register with it and join its swarm."""
    key: Optional[Path] = None
    """Ed25519 signing key (PEM; created if missing); none: a new one per start."""
    run_id: Optional[str] = None
    """Which published run to join when the swarm has several."""
    checkpoint: Optional[Path] = None
    """Start from this coordinator checkpoint (a round-NNNNNN folder) instead of θ_0."""
    dht: DHTSettings = Field(default_factory=DHTSettings)
    """Where the DHT listens, who it dials first, and who it is."""

    model_config = Checked.model_config | {"strict": False}  # paths come as strings from the command line

    @field_validator("coordinator")
    @classmethod
    def _host_port(cls, address: Optional[str]) -> Optional[str]:
        if address is not None:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not HOST:PORT")
        return address

    @property
    def joins_existing(self) -> bool:
        """Whether this peer joins a swarm that runs already (else it starts one)."""
        return bool(self.dht.initial_peers or self.coordinator)
