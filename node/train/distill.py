"""Distillation: the warm start that lets GRPO begin from a non-zero reward.

GRPO learns nothing from a group whose rewards are all equal, and a random model
gets every answer wrong. So a run first teaches the student the task's answer
format from a teacher: either the task's reference solutions (text SFT), or a
teacher model's greedy outputs. When teacher and student share a tokenizer, the
student also matches the teacher's full token distributions (KL to its logits),
which carries more signal per token than the sampled text alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from node.train.logprobs import completion_logits, token_logps
from node.train.models import Policy, trainable_parameters
from node.train.rollouts import encode_completions, encode_prompts, generate
from protocol.tasks import Question, Task, TaskError


@dataclass
class DistillSettings:
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    max_new_tokens: int = 64  # teacher completions only


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def _encode(student: Policy, prompts: list[str], targets: list[str]):
    return (*encode_prompts(student.tokenizer, prompts, student.device),
            *encode_completions(student.tokenizer, targets, student.device))


def sft_loss(student: Policy, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """Mean negative log-likelihood of ``targets`` + EOS after ``prompts``."""
    prompt_ids, prompt_mask, ids, mask = _encode(student, prompts, targets)
    logits = completion_logits(student.model, prompt_ids, prompt_mask, ids, mask)
    return -(token_logps(logits, ids) * mask).sum() / mask.sum()


def logit_kl_loss(student: Policy, teacher: Policy, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """KL(teacher ‖ student) per completion token, on the teacher's own completions."""
    prompt_ids, prompt_mask, ids, mask = _encode(student, prompts, targets)
    with torch.no_grad():
        on_teacher = [t.to(teacher.device) for t in (prompt_ids, prompt_mask, ids, mask)]
        teacher_logits = completion_logits(teacher.model, *on_teacher).to(student.device)
    student_logps = F.log_softmax(completion_logits(student.model, prompt_ids, prompt_mask, ids, mask).float(), -1)
    teacher_logps = F.log_softmax(teacher_logits.float(), -1)
    per_token = (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)
    return (per_token * mask).sum() / mask.sum()


def _sample_questions(task: Task, count: int, rng: random.Random, need_solutions: bool) -> list[Question]:
    """Random train questions; for SFT only those that come with a reference solution."""
    picked: list[Question] = []
    for _ in range(count * 20):
        question = task.question(rng.randrange(task.size("train")))
        if question.solution or not need_solutions:
            picked.append(question)
        if len(picked) == count:
            return picked
    raise TaskError(f"{task.name}: too few reference solutions to distill from; "
                    "use a teacher model (--teacher) or set warm_start.steps=0")


def distill(student: Policy, task: Task, settings: DistillSettings, teacher: Policy | None = None,
            on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``student`` for ``settings.steps`` batches of train-split questions; returns the losses."""
    rng = random.Random(settings.seed)
    use_logits = teacher is not None and same_tokenizer(student.tokenizer, teacher.tokenizer)
    optimizer = torch.optim.AdamW(trainable_parameters(student.model), lr=settings.lr)
    student.model.train()
    losses = []
    for step in range(settings.steps):
        questions = _sample_questions(task, settings.batch_size, rng, need_solutions=teacher is None)
        raw = [q.prompt for q in questions]
        prompts = student.render(raw)
        if teacher is None:
            targets = [q.solution for q in questions]
        else:
            targets = generate(teacher.model, teacher.tokenizer, teacher.render(raw), 1, settings.max_new_tokens,
                               greedy=True).texts
        loss = logit_kl_loss(student, teacher, prompts, targets) if use_logits else sft_loss(student, prompts, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(student.model), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
