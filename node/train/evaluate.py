"""Held-out accuracy: greedy completions on the task's eval split."""

from __future__ import annotations

from dataclasses import dataclass

from node.runlog import RunLog
from node.train.models import Policy
from node.train.rollouts import generate
from protocol.config import RunConfig
from protocol.tasks import Task


@dataclass
class EvalResult:
    accuracy: float
    format_rate: float
    questions: int
    examples: list[tuple[str, str, str]]  # (prompt, completion, answer) for a look by eye


def evaluate(policy: Policy, task: Task, questions: int, max_new_tokens: int, batch_size: int = 256) -> EvalResult:
    """Greedy-decode the first ``questions`` eval questions and score them with the task's verifier."""
    count = min(questions, task.size("eval"))
    qs = [task.question(i, "eval") for i in range(count)]
    correct = formatted = 0.0
    examples = []
    for start in range(0, count, batch_size):
        chunk = qs[start:start + batch_size]
        texts = generate(policy.model, policy.tokenizer, policy.render([q.prompt for q in chunk]), 1, max_new_tokens,
                         greedy=True).texts
        correct += sum(task.correctness(q, t) for q, t in zip(chunk, texts, strict=True))
        formatted += sum(task.format_ok(t) for t in texts)
        examples += [(q.prompt, t, q.answer) for q, t in zip(chunk, texts, strict=True)][: max(0, 5 - len(examples))]
    return EvalResult(accuracy=correct / count, format_rate=formatted / count, questions=count, examples=examples)


def evaluate_and_log(policy: Policy, task: Task, config: RunConfig, log: RunLog, round_: int) -> float:
    """Held-out accuracy of the model after ``round_`` rounds, written to the run log."""
    result = evaluate(policy, task, config.eval.questions, config.rollout.max_new_tokens)
    log.write("eval", round_, accuracy=result.accuracy, format_rate=result.format_rate, questions=result.questions)
    return result.accuracy
