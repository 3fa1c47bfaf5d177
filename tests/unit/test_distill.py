"""Distillation on the tiny model: from reference solutions (SFT) and from a teacher's logits."""

import dataclasses

import pytest
import torch

from node.train.distill import DistillSettings, distill, same_tokenizer
from node.train.models import load_policy
from protocol.config import load_config
from protocol.tasks import Question, TaskError, load_task


@pytest.fixture(scope="module")
def config():
    return load_config()


def test_sft_on_reference_solutions_lowers_the_loss(config):
    torch.manual_seed(0)
    student = load_policy(config.model)
    losses = distill(student, load_task("arithmetic"), DistillSettings(steps=40, batch_size=32, lr=2e-3))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_teacher_with_the_same_tokenizer_is_matched_on_its_logits(config):
    task = load_task("arithmetic")
    teacher = load_policy(config.model, seed=0)
    distill(teacher, task, DistillSettings(steps=30, batch_size=32, lr=2e-3))  # a teacher with opinions
    student = load_policy(config.model, seed=1)
    assert same_tokenizer(student.tokenizer, teacher.tokenizer)
    losses = distill(student, task, DistillSettings(steps=30, batch_size=16, lr=2e-3, max_new_tokens=6),
                     teacher=teacher)
    assert losses[0] > 0.5  # KL between two different models
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_task_without_reference_solutions_needs_a_teacher(config):
    task = load_task("arithmetic")

    class NoSolutions(type(task)):
        def question(self, index, split="train"):
            return dataclasses.replace(super().question(index, split), solution="")

    task.__class__ = NoSolutions
    with pytest.raises(TaskError, match="too few reference solutions"):
        distill(load_policy(config.model), task, DistillSettings(steps=1, batch_size=4, lr=1e-3))
    assert isinstance(task.question(0), Question)
