"""The peer: train/ (the compute), swarm/ (the network layer over hivemind), peer/ (the trainer role),
verify/ (the verifier role), bench/ (benchmarks and the attack catalogue). It never imports coordinator/."""
