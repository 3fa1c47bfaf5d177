"""The run as people see it: the web dashboard (server.py, page.py), Prometheus metrics (metrics.py), and
the terminal view of ``grpo-swarm status`` (terminal.py), sharing their formatting (format.py)."""
