"""The sections of a run config (``[run]``, ``[model]``, ...): each a checked model, one docstring per field.

``grpo-swarm config schema`` prints them as JSON schema with these docstrings; ``grpo-swarm config show``
prints a resolved config as TOML.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from protocol.config.checked import Checked

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
DType = Literal["float32", "bfloat16", "float16"]
Compression = Literal["none", "fp16", "uniform8bit", "quantile8bit"]
RUN_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"


class Section(Checked):
    """A section of the run config; errors name its fields ``section.field``."""

    def __init_subclass__(cls, section: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if section:
            cls.field_prefix = f"{section}."


class RunSection(Section, section="run"):
    id: str = Field("local", json_schema_extra={"pattern": RUN_ID_PATTERN})
    """The run's name: 1-64 letters, digits, '-' or '_' (it names DHT keys)."""
    seed: int = 0
    """Seeds the question shards, sampling, sketches and the tiny preset's initial weights."""
    rounds: int = Field(80, gt=0)
    """GRPO rounds to train; round r turns θ_r into θ_{r+1}."""

    @field_validator("id")
    @classmethod
    def _names_keys(cls, run_id: str) -> str:
        if not re.fullmatch(RUN_ID_PATTERN, run_id):
            raise ValueError("must be 1-64 letters, digits, '-' or '_' (it names DHT keys)")
        return run_id


class ModelSection(Section, section="model"):
    name: str = Field("tiny", min_length=1)
    """"tiny" (the built-in preset), a Hugging Face model name or a local model folder."""
    dtype: DType = "float32"
    """Weights' dtype (the audit's tolerances follow it)."""
    device: str = "auto"
    """torch device; "auto" picks CUDA when available."""
    lora_rank: int = Field(0, ge=0)
    """> 0: train LoRA adapters of this rank (the reference model is the base with adapters off); 0: full."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator."""
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Module names that get LoRA adapters."""
    chat_template: bool = False
    """Wrap prompts in the tokenizer's chat template as a user turn."""


class TaskSection(Section, section="task"):
    name: str = "arithmetic"
    """"arithmetic", "rg:<reasoning-gym dataset>" or "gsm8k"."""
    format_reward: float = Field(0.0, ge=0)
    """Weight of the format reward (one <answer> tag) next to the correctness reward."""
    options: dict[str, Any] = {}
    """Task-specific settings, e.g. { digits = 2, ops = "+" } for arithmetic."""

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from protocol.tasks import known_task  # the registry pulls in the task libraries; the schema does not

        problem = known_task(name)
        if problem:
            raise ValueError(problem)
        return name


class RolloutSection(Section, section="rollout"):
    group_size: int = Field(8, ge=2)
    """G: completions sampled per question (a group needs two to compare)."""
    questions_per_peer: int = Field(32, gt=0)
    """Questions in each peer's shard per round."""
    max_new_tokens: int = Field(8, gt=0)
    """Longest completion, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature T."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass in (0, 1]."""


class GRPOSection(Section, section="grpo"):
    loss_type: LossType = "dapo"
    """Normalization of the per-token loss, as in TRL (dapo: token mean over the union batch)."""
    beta: float = Field(0.0, ge=0)
    """Weight of the k3 KL penalty against the reference model."""
    epsilon_low: float = Field(0.2, ge=0)
    """Lower clipping range of the ratio: 1 - epsilon_low."""
    epsilon_high: float = Field(0.2, ge=0)
    """Upper clipping range of the ratio: 1 + epsilon_high."""
    delta: Optional[float] = Field(None, gt=1)
    """Cap on the unclipped ratio (INTELLECT-2's δ); unset: no cap."""
    scale_rewards: ScaleRewards = "group"
    """Divide advantages by the group's std, the batch's, or not at all (none: Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave completions without EOS out of the loss."""
    num_iterations: int = Field(1, gt=0)
    """μ: > 1 reuses the round's rollouts with the sampling log-probs as π_old."""


class OptimSection(Section, section="optim"):
    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate (for the tiny preset; ~1e-6 for billion-parameter models)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the averaged gradient to this norm; 0 disables clipping."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW β1."""
    adam_beta2: float = Field(0.99, ge=0, lt=1)
    """AdamW β2."""
    adam_epsilon: float = Field(1e-8, gt=0)
    """AdamW ε."""
    micro_batch_size: int = Field(0, ge=0)
    """Rows per forward/backward pass; 0: the whole batch at once."""


class WarmStartSection(Section, section="warm_start"):
    steps: int = Field(1500, ge=0)
    """Distillation steps from the task's reference solutions before GRPO; 0: off."""
    batch_size: int = Field(64, gt=0)
    """Questions per distillation step."""
    lr: float = Field(2e-3, gt=0)
    """Distillation learning rate."""


class EvalSection(Section, section="eval"):
    every: int = Field(10, gt=0)
    """Evaluate held-out accuracy every this many rounds (and after the last)."""
    questions: int = Field(400, gt=0)
    """Held-out questions per evaluation (greedy)."""


class CheckpointSection(Section, section="checkpoint"):
    every: int = Field(20, ge=0)
    """Save (solo) or take from peers (coordinator) a checkpoint every this many rounds; 0: only at the end."""


class SwarmSection(Section, section="swarm"):
    min_group_size: int = Field(2, ge=2)
    """Smallest group an all-reduce runs with (averaging alone is not a swarm)."""
    target_group_size: int = Field(64, ge=2)
    """Largest group matchmaking forms; more peers form several groups."""
    matchmaking_time: float = Field(3.0, gt=0)
    """Seconds a peer waits for others to join its group."""
    allreduce_timeout: float = Field(15.0, gt=0)
    """Bound on one all-reduce once the group formed (a frozen peer is waited on no longer)."""
    next_chunk_timeout: float = Field(5.0, gt=0)
    """A peer silent this long during the all-reduce is dropped (and the round fails)."""
    agreement_timeout: float = Field(10.0, gt=0)
    """Seconds to wait for the other members' digests of the result."""
    compression: Compression = "none"
    """Wire format of the all-reduce's parts."""
    state_timeout: float = Field(60.0, gt=0)
    """Seconds to load the current state from peers."""
    max_failed_rounds: int = Field(40, gt=0)
    """Consecutive failed rounds before a peer gives up with one error line."""
    linger: float = Field(60.0, ge=0)
    """Seconds a finished peer keeps serving its state to live peers still behind."""


class TrustSection(Section, section="trust"):
    """Audits of contributions and the all-reduce's defences (docs/DESIGN.md "Trust").

    Every tolerance bounds honest noise with a margin; node/verify/tolerances.py gives the honest
    distributions they were set from (``grpo-swarm bench verifier`` measures them again). Unset
    tolerances take the measured default for ``model.dtype``: bf16 rounding noise is ~10^4 times fp32's.
    """

    audit_units: int = Field(8, gt=0)
    """Units (runs of whole question groups) a contribution's gradient is sketched in."""
    audit_sample: int = Field(2, gt=0)
    """Units a verifier recomputes per audit."""
    audit_rate: float = Field(1.0, gt=0, le=1)
    """Fraction of contributions a verifier audits."""
    logprob_max_abs: Optional[float] = Field(None, gt=0)
    """Largest |sampling - prefill log-prob| of an audited token."""
    logprob_mean_abs: Optional[float] = Field(None, gt=0)
    """Mean |sampling - prefill log-prob| over the audited tokens."""
    sketch_min_cosine: Optional[float] = Field(None, gt=-1, le=1)
    """Smallest cosine between a recomputed unit sketch and the committed one."""
    sketch_norm_tolerance: Optional[float] = Field(None, gt=0)
    """Largest |committed / recomputed unit sketch norm - 1|."""
    sketch_noise_floor: Optional[float] = Field(None, gt=0)
    """A unit deviating by at most this x the committed units' RMS norm is rounding noise, whatever its angle."""
    surprisal_max_z: float = Field(6.0, gt=0)
    """Tokens less likely than sampling from θ_r makes them, in standard errors."""
    grad_norm_factor: float = Field(2.0, gt=1)
    """Largest factor between the committed gradient norm and its sketch's norm."""
    clip_factor: float = Field(4.0, ge=0)
    """Reducers clip each sender's part to this x the median part norm; 0: the exact mean."""
    binding_tolerance: float = Field(2e-3, gt=0)
    """Relative error allowed between a sender's part sketches and its committed sketch (measured on the tiny
    model's gradients: none ~1e-7, fp16 1.8e-4..2.3e-4, 8-bit 0.26..0.69)."""
    token_lifetime: float = Field(600.0, gt=0)
    """Seconds an access token is valid (renewed in the background; the coordinator's --token-lifetime)."""
    rollout_history: int = Field(4, gt=0)
    """Rounds a peer keeps its rollout bundles for verifiers."""
