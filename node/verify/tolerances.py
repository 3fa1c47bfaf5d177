"""How far an honest recomputation can be from the contributor's, per model dtype.

Honest distributions behind the tolerances (defaults: tiny model after its warm start, arithmetic,
G 8, 32 questions, 8 units, 2 sampled; rounds 0.. cycling 4 peer ids, both models stepping every
round; CPU; min / median / max):

- float32, 100 contributions (bench verifier): max |Δlogp| 1.5e-6 / 5.7e-6 / 4.0e-5; mean |Δlogp|
  3.0e-7 / 5.2e-7 / 1.4e-6; unit sketches bit-identical (cosine 1, ratio 1, deviation 0);
  surprisal z −2.0 / −0.2 / 2.9; committed sketch norm / grad_norm 0.89 / 1.00 / 1.11; committed
  sketch vs sum of unit sketches 2.1e-8 / 2.5e-8 / 3.0e-8 (float32 rounding of the record).
- float32, verifier weights 1 ulp off (each weight moved by at most one ulp: a stand-in for other
  hardware), 60 contributions: max |Δlogp| up to 3.7e-5, mean up to 2.1e-6, 1 − cosine up to
  8.6e-11, |ratio − 1| up to 7.6e-6, deviation up to 1.7e-5. Defaults: 1e-3, 1e-4, 0.99, 0.05 and
  a noise floor of 1e-3, all ≥ 25× the worst honest value.
- bfloat16 on one machine (verifier on 2 threads, contributor on 1), 60 contributions: max |Δlogp|
  ≤ 9.5e-7, sketches bit-identical: CPU bf16 kernels here are deterministic.
- bfloat16, verifier weights 1 ulp off, 150 contributions: max |Δlogp| 6e-7 / 0.26 / 4.2 (p99
  1.3); mean |Δlogp| up to 0.054; unit cosine down to 0.42 and norm ratio 0.77..1.94, but those
  are units that nearly cancel: deviation / committed units' RMS norm 0 / 0.031 / 0.31 (p99
  0.28). Defaults: max 8, mean 0.15, noise floor 0.6 (about 2× each). Under this stand-in,
  other-model completions (mean |Δlogp| ~6), sign flips (deviation 1.9), another gradient
  (1.3..1.6) and scaling still fail, but single edited tokens (|Δlogp| ~4.6) hide in the noise.
  The stand-in is harsh (every weight moved); run the bench on the swarm's hardware and set
  tighter [trust] values when it is quieter.

Attacks for scale (float32): another model's completions max |Δlogp| ~12, surprisal z ~300
with recomputed log-probs; an edited answer with its old log-prob |Δlogp| ~6; a sign flip cosine
−1; ×10 ratio 10; a sketch of another batch's gradient cosine −0.5..0.86.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from protocol.config import RunConfig


@dataclass(frozen=True)
class Tolerances:
    """How far an honest recomputation can be from the contributor's (names as in the [trust] section)."""

    logprob_max_abs: float
    logprob_mean_abs: float
    sketch_min_cosine: float
    sketch_norm_tolerance: float
    sketch_noise_floor: float


# Per model.dtype, set from the honest distributions in the module doc with a margin. float16 is not
# measured (the tiny model overflows in fp16 on CPU); with 3 more mantissa bits than bfloat16,
# bfloat16's bounds hold for it.
DTYPE_TOLERANCES = {
    "float32": Tolerances(logprob_max_abs=1e-3, logprob_mean_abs=1e-4, sketch_min_cosine=0.99,
                          sketch_norm_tolerance=0.05, sketch_noise_floor=1e-3),
    "bfloat16": Tolerances(logprob_max_abs=8.0, logprob_mean_abs=0.15, sketch_min_cosine=0.99,
                           sketch_norm_tolerance=0.05, sketch_noise_floor=0.6),
}
DTYPE_TOLERANCES["float16"] = DTYPE_TOLERANCES["bfloat16"]


def tolerances(config: RunConfig) -> Tolerances:
    """The [trust] tolerances that are set, the model dtype's defaults for the others."""
    defaults = DTYPE_TOLERANCES[config.model.dtype]
    chosen = {f.name: getattr(config.trust, f.name) for f in dataclasses.fields(Tolerances)}
    return Tolerances(**{name: getattr(defaults, name) if value is None else value for name, value in chosen.items()})
