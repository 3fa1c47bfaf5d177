"""``grpo-swarm bench grpo``: our rollouts and GRPO step next to TRL's ``GRPOTrainer``.

Both sides run in this one process, each on its own copy of the configured model
loaded the same way, with the same tokenizer, prompts, G, max new tokens,
sampling, loss and optimizer settings. Their rounds interleave (TRL's round k,
then ours from TRL's step-end callback), so load from other processes falls on
both alike. Each side runs one warm-up round and then ``repeats`` measured rounds
on new prompts; the table shows each row's best round (on a shared machine the
least disturbed one: other processes only ever add time). What is timed:

- rollout: ours ``node.train.rollouts.generate``; TRL ``GRPOTrainer._generate``
  (tokenize, ``model.generate``, decode). Tokens/s counts the completion tokens
  actually sampled (up to and including EOS) the same way on both sides, so an
  early EOS flatters neither.
- GRPO step: ours ``Learner.gradient`` + ``Learner.apply``; TRL its whole
  optimizer step (callback ``on_step_begin`` to ``on_step_end``) minus
  ``_generate_and_score_completions``: loss forward/backward, clipping, optimizer
  and scheduler step and the trainer's own bookkeeping.
- round: ours ``Learner.collect`` + the step (``collect`` samples again, so the
  rollout row and the round use different samples); TRL the whole step.
- peak memory: how far the warm-up round (the same shapes as every round, plus
  the optimizer state's creation) raised memory above its level at the round's
  start: CUDA's allocator peak, or on CPU the process RSS sampled every 5 ms,
  after handing heap memory freed earlier back to the OS (glibc ``malloc_trim``).
  Only the untimed warm-up is sampled: the trim and the sampler slow a round.
"""

from __future__ import annotations

import ctypes
import gc
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch
from rich.console import Console
from rich.table import Table

from node.train.learner import Learner
from node.train.models import Policy, load_policy
from node.train.rollouts import generate
from protocol.config import ConfigError, RunConfig
from protocol.rewards import reward_functions
from protocol.tasks import Question, Task, load_task

MIB = 2**20
INSTALL_HINT = "pip install grpo-swarm[trl]"


@dataclass
class Timings:
    """One side's measured rounds, and the memory of its warm-up round."""

    rollout_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    round_s: list[float] = field(default_factory=list)
    peak_mib: float = 0.0

    def record(self, rollout_s: float, tokens: int, step_s: float, round_s: float) -> None:
        self.rollout_s.append(rollout_s)
        self.tokens.append(tokens)
        self.step_s.append(step_s)
        self.round_s.append(round_s)


# (row label, value of one side, higher is better)
ROWS = [
    ("rollout tokens/s", lambda t: max(n / s for n, s in zip(t.tokens, t.rollout_s, strict=True)), True),
    ("rollout s per batch", lambda t: min(t.rollout_s), False),
    ("GRPO step s (gradient + apply)", lambda t: min(t.step_s), False),
    ("round s (rollouts, rewards, step)", lambda t: min(t.round_s), False),
    ("peak memory growth MiB", lambda t: t.peak_mib, False),
]


class PeakMemory:
    """Peak memory between ``start()`` and ``stop()`` above its level at ``start()``, in MiB."""

    def __init__(self, device: torch.device):
        self.device, self._process = device, psutil.Process()

    def _now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._process.memory_info().rss

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self._peak = max(self._peak, self._now())

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_memory()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = self._peak = self._now()

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._done.set()
            self._thread.join()
            self._peak = max(self._peak, self._now())
        return (self._peak - self._start) / MIB


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS, so RSS growth is what this round allocates."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: growth is then a lower bound
        pass


def prompt_blocks(config: RunConfig, task: Task, repeats: int) -> list[list[Question]]:
    """One block of ``questions_per_peer`` train questions per round, warm-up first."""
    q = config.rollout.questions_per_peer
    return [[task.question(i) for i in range(k * q, (k + 1) * q)] for k in range(repeats + 1)]


class Ours:
    """Our learner, run one round at a time so that its rounds can interleave with TRL's."""

    def __init__(self, policy: Policy, config: RunConfig, task: Task):
        self.policy, self.config = policy, config
        self.learner = Learner(policy, config, task)
        self.generator = torch.Generator().manual_seed(config.run.seed)
        self.memory = PeakMemory(policy.device)
        self.timings = Timings()

    def round(self, questions: list[Question], warm_up: bool) -> None:
        rollout, policy = self.config.rollout, self.policy
        if warm_up:
            self.memory.start()
        start = time.perf_counter()
        rollouts = generate(policy.model, policy.tokenizer, policy.render([q.prompt for q in questions]),
                            rollout.group_size, rollout.max_new_tokens, rollout.temperature, rollout.top_p,
                            generator=self.generator)
        generated = time.perf_counter()
        batch = self.learner.collect(questions, self.generator)
        collected = time.perf_counter()
        self.learner.apply(self.learner.gradient(batch).tensors)
        stepped = time.perf_counter()
        if warm_up:
            self.timings.peak_mib = self.memory.stop()
        else:
            self.timings.record(generated - start, rollouts.num_tokens, stepped - collected, stepped - generated)


def trl_prompt(tokenizer, prompt: str) -> str:
    """The prompt text TRL must tokenize to get our ids: we always start with BOS, TRL only if the tokenizer adds it."""
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("0")["input_ids"][:1] == [bos]:
        return prompt
    return tokenizer.bos_token + prompt


def trl_reward(function, task: Task):
    """Our reward function in TRL's signature: dataset columns arrive as keyword lists."""
    def reward(completions, index, **_):
        return [function.fn(task.question(i), c) for i, c in zip(index, completions, strict=True)]

    reward.__name__ = function.name
    return reward


def timed(method, now: dict, name: str):
    """Wrap a trainer method to record (seconds, result) under ``name`` for the current round."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        now[name] = (time.perf_counter() - start, result)
        return result

    return wrapper


def measure_trl(config: RunConfig, task: Task, blocks: list[list[Question]],
                after_round: Callable[[int], None]) -> Timings:
    """TRL's rounds on ``blocks``, calling ``after_round(k)`` after round k, outside its timing."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    policy = load_policy(config.model, config.run.seed)
    rollout, grpo, optim = config.rollout, config.grpo, config.optim
    rows = rollout.group_size * rollout.questions_per_peer
    micro = optim.micro_batch_size or rows
    if rows % micro:
        raise ConfigError(f"optim.micro_batch_size: must divide the {rows} rows of a round to compare with TRL")
    questions = [q for block in blocks for q in block]
    dataset = Dataset.from_dict({"prompt": [trl_prompt(policy.tokenizer, q.prompt) for q in questions],
                                 "index": [q.index for q in questions]})
    rewards = reward_functions(task, config.task.format_reward)
    timings, memory, now = Timings(), PeakMemory(policy.device), {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                memory.start()
            now["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - now["start"]
            (rollout_s, generated), (collect_s, _) = now["rollout"], now["collect"]
            k = state.global_step - 1
            if k == 0:
                timings.peak_mib = memory.stop()
            else:
                timings.record(rollout_s, sum(len(ids) for ids in generated[1]), seconds - collect_s, seconds)
            after_round(k)

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, max_steps=len(blocks), per_device_train_batch_size=micro,
            gradient_accumulation_steps=rows // micro, num_generations=rollout.group_size,
            max_completion_length=rollout.max_new_tokens, temperature=rollout.temperature, top_p=rollout.top_p,
            learning_rate=optim.lr, lr_scheduler_type="constant", weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, max_grad_norm=optim.max_grad_norm,
            beta=grpo.beta, epsilon=grpo.epsilon_low, epsilon_high=grpo.epsilon_high, delta=grpo.delta,
            loss_type=grpo.loss_type, scale_rewards=grpo.scale_rewards,
            mask_truncated_completions=grpo.mask_truncated_completions, reward_weights=[f.weight for f in rewards],
            shuffle_dataset=False, seed=config.run.seed, use_cpu=policy.device.type == "cpu", bf16=False,
            fp16=False, activation_checkpointing=False, report_to="none", logging_strategy="no",
            save_strategy="no", disable_tqdm=True,
        )
        trainer = GRPOTrainer(model=policy.model, processing_class=policy.tokenizer, args=args,
                              reward_funcs=[trl_reward(f, task) for f in rewards], train_dataset=dataset,
                              callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics dict
        trainer._generate = timed(trainer._generate, now, "rollout")
        trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, now, "collect")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TRL calls deprecated transformers APIs
            trainer.train()
    return timings


def settings_line(config: RunConfig, policy: Policy, repeats: int, trl_version: str | None) -> str:
    params = sum(p.numel() for p in policy.model.parameters())
    r, g = config.rollout, config.grpo
    return (f"model {config.model.name} ({params / 1e6:.2f}M params, {config.model.dtype}, {policy.device}), "
            f"G {r.group_size}, prompts {r.questions_per_peer}, max_new_tokens {r.max_new_tokens}, "
            f"temperature {r.temperature}, loss {g.loss_type}, beta {g.beta}, "
            f"{torch.get_num_threads()} threads, best of {repeats} rounds after 1 warm-up, "
            f"TRL {trl_version or 'not installed'}")


def results_table(results: dict[str, Timings]) -> Table:
    table = Table(title="GRPO: ours vs TRL GRPOTrainer" if "TRL" in results else "GRPO: ours")
    table.add_column("")
    for side in results:
        table.add_column(side, justify="right")
    if "TRL" in results:
        table.add_column("advantage", justify="right")
        table.caption = "advantage > 1: ours is better (more tokens/s, fewer seconds, less memory)"
    for label, value, higher_is_better in ROWS:
        values = {side: value(t) for side, t in results.items()}
        cells = [f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}" for v in values.values()]
        if "TRL" in values:
            ours, trl = values["ours"], values["TRL"]
            if ours > 0 and trl > 0:
                cells.append(f"{ours / trl if higher_is_better else trl / ours:.2f}x")
            else:  # memory that did not grow
                cells.append("n/a")
        table.add_row(label, *cells)
    return table


def run_grpo_bench(config: RunConfig, repeats: int, console: Console | None = None) -> dict[str, Timings]:
    console = console or Console()
    if repeats < 1:
        raise ConfigError(f"--repeats: must be >= 1 (got {repeats})")
    task = load_task(config.task.name, config.task.options)
    blocks = prompt_blocks(config, task, repeats)
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    policy = load_policy(config.model, config.run.seed)
    console.print(settings_line(config, policy, repeats, trl_version))
    ours = Ours(policy, config, task)
    results = {"ours": ours.timings}
    if trl_version:
        results["TRL"] = measure_trl(config, task, blocks, lambda k: ours.round(blocks[k], warm_up=k == 0))
    else:
        for k, block in enumerate(blocks):
            ours.round(block, warm_up=k == 0)
    console.print(results_table(results))
    if not trl_version:
        console.print(f"TRL is not installed: {INSTALL_HINT} to compare with TRL's GRPOTrainer", markup=False)
    return results
