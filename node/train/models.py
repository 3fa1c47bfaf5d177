"""Loading the policy: any Hugging Face causal LM, or the built-in tiny preset.

The tiny preset is a real transformers architecture (Llama) with a character-level
tokenizer made locally, so the whole system runs offline. It is written to disk with
``save_pretrained`` and read back with ``from_pretrained``, exactly like a hub model:
there is one loading path, not a special case for tests.
"""

from __future__ import annotations

import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from protocol.config import ModelSection

TINY = "tiny"
_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which and why, in one line."""


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    chat_template: bool = False

    @property
    def uses_lora(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    def render(self, prompts: list[str]) -> list[str]:
        """Task prompts as the model expects them: raw, or as a user turn of its chat template."""
        if not self.chat_template:
            return prompts
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts]


def home_dir() -> Path:
    return Path(os.environ.get("GRPO_SWARM_HOME", Path.home() / ".cache" / "grpo-swarm"))


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def make_char_tokenizer():
    """Printable ASCII, one token per character: small, fixed, identical on every machine."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95]) + ["\n"]
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def ensure_tiny_preset(seed: int = 0) -> Path:
    """Write the tiny preset (random init from ``seed``) once; later calls reuse it."""
    from transformers import LlamaForCausalLM

    path = home_dir() / "presets" / f"{TINY}-seed{seed}"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    quiet_transformers()
    tokenizer = make_char_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(path)
    except OSError:  # another process wrote the same preset first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def quiet_transformers() -> None:
    """Our own progress display is the one the user reads; transformers' bars are noise here."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_policy(section: ModelSection, seed: int = 0, path: str | None = None) -> Policy:
    """Load the model named in the config (or an explicit local ``path``) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    source = path or (str(ensure_tiny_preset(seed)) if section.name == TINY else section.name)
    device = resolve_device(section.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[section.dtype])
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"model.name: cannot load {source!r}: not a local model folder, and it could not be fetched"
            f" from the Hugging Face hub ({first_line})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if section.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"model.chat_template: the tokenizer of {source!r} has no chat template")
    model.to(device)
    if section.lora_rank > 0:
        model = _add_lora(model, section)
    return Policy(model=model, tokenizer=tokenizer, device=device, chat_template=section.chat_template)


def _add_lora(model, section: ModelSection):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=section.lora_rank, lora_alpha=section.lora_alpha, target_modules=list(section.lora_targets),
        lora_dropout=0.0, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
