"""A tiny Llama and the pieces llm-compressor's ``oneshot`` needs, built offline.

Nothing is downloaded: the model has random weights from a seed, its config is saved to
a temporary directory (``oneshot`` reads the config back from ``name_or_path``), the
tokenizer is a word-level vocabulary built in memory, and the calibration samples are
random token ids. Import only after ``pytest.importorskip("llmcompressor")``.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 256
HIDDEN = 128  # W4A16's quantization groups are 128 columns wide
SAMPLES = 16
SEQ_LEN = 32


def tiny_llama(
    config_dir: Path,
    seed: int = 0,
    *,
    hidden: int = HIDDEN,
    layers: int = 2,
    seq_len: int = SEQ_LEN,
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * seq_len,
    )
    config.save_pretrained(config_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.config._name_or_path = str(config_dir)
    return model


def in_memory_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {f"w{i}": i for i in range(VOCAB - len(specials))}
    vocab.update({token: VOCAB - len(specials) + i for i, token in enumerate(specials)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def calibration_samples(
    seed: int = 1, *, samples: int = SAMPLES, seq_len: int = SEQ_LEN
) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 4, (samples, seq_len), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * samples}
    )


def hidden_state_bytes(samples: int = SAMPLES, seq_len: int = SEQ_LEN, hidden: int = HIDDEN) -> int:
    """Bytes of one layer's hidden states over all samples (float32)."""
    return samples * seq_len * hidden * 4


def calibrate(
    config_dir: Path,
    recipe: Any,
    *,
    prefetch: bool,
    hidden: int = HIDDEN,
    layers: int = 2,
    samples: int = SAMPLES,
    seq_len: int = SEQ_LEN,
    model: Any = None,
    **oneshot_args: Any,
) -> dict[str, torch.Tensor]:
    """Run ``oneshot`` with the sequential pipeline over every sample in order, or as
    ``oneshot_args`` say (``propagate_error=False``, ``pipeline="independent"``,
    ``shuffle_calibration_samples=True``, ``num_calibration_samples``), on ``model``
    (None: a tiny Llama made in ``config_dir``); the calibrated state dict."""
    from llmcompressor import oneshot

    settings = {
        "pipeline": "sequential",
        "shuffle_calibration_samples": False,
        "num_calibration_samples": samples,
        **oneshot_args,
    }
    if model is None:
        model = tiny_llama(config_dir, hidden=hidden, layers=layers, seq_len=seq_len)
    model = oneshot(
        model=model,
        processor=in_memory_tokenizer(),
        dataset=calibration_samples(samples=samples, seq_len=seq_len),
        recipe=recipe,
        max_seq_length=seq_len,
        sequential_prefetch=prefetch,
        **settings,
    )
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    del model
    gc.collect()  # llm-compressor never closes its caches: collecting them frees their files
    return state


def gptq_recipe() -> Any:
    from llmcompressor.modifiers.quantization import GPTQModifier

    return GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])


def awq_recipe() -> Any:
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [
        AWQModifier(),
        QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
    ]


def awq_gptq_recipe() -> Any:
    """AWQ's smoothing, then GPTQ's quantization of the smoothed weights."""
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(), GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]


# The recipes the integration tests and bench/llmcompressor_oneshot.py run, by name.
RECIPES = {"gptq": gptq_recipe, "awq": awq_recipe, "awq+gptq": awq_gptq_recipe}


@contextlib.contextmanager
def stock_pin_memory_without_accelerator() -> Iterator[None]:
    """The stock cache's ``pin_memory`` raises without an accelerator ("Cannot access
    accelerator device"); pinning changes where bytes live, never their values, so the
    stock reference run skips it on a machine that has none."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original: Callable[..., None] = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original
