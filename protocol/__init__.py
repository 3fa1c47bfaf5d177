"""What every role must agree on, bit for bit: config, tasks and rewards, shards, signatures, schemas."""
