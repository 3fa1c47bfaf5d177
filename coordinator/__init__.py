"""The control plane: the gRPC service and its SQLite ledger, the DHT records it publishes, checkpoints taken
from peers, and the dashboard. It runs the swarm code of node/ for its DHT and checkpointer."""
