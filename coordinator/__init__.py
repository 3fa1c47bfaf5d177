"""The control plane: admission, ledger, checkpoints, dashboard, and the local-swarm launcher."""
