"""Metrics as JSON lines, and a plot of them that a person can read at a glance.

Two kinds of record: ``train`` (one per round: reward, loss, KL, ...) and ``eval``
(held-out accuracy of the model after ``round`` steps).
"""

from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, round_: int, **values) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "round": round_, **values}) + "\n")

    def records(self, kind: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in rows if kind is None or r["kind"] == kind]

    def truncate_after(self, round_: int) -> None:
        """Forget records past ``round_`` (a resumed run replays those rounds)."""
        kept = [r for r in self.records() if r["round"] <= round_]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_run(log: RunLog, png: str | Path, title: str = "GRPO run") -> Path:
    """Reward per round and held-out accuracy, on one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = log.records("train"), log.records("eval")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot([r["round"] for r in train], [r["reward"] for r in train], color="tab:blue", alpha=0.35,
                label="reward (sampled, per round)")
        window = max(1, len(train) // 15)
        smooth = [sum(r["reward"] for r in train[max(0, i - window + 1):i + 1]) / min(window, i + 1)
                  for i in range(len(train))]
        ax.plot([r["round"] for r in train], smooth, color="tab:blue", label=f"reward ({window}-round mean)")
    if evals:
        ax.plot([r["round"] for r in evals], [r["accuracy"] for r in evals], "o-", color="tab:red",
                label="held-out accuracy (greedy)")
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
