"""The verifier role: the checks (checks.py), the audit that recomputes a contribution (audit.py,
recompute.py, tolerances.py), the decision on a trainer's round (judge.py) and the verifier's loop."""
