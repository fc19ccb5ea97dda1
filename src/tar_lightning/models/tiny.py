"""Tiny models built in code, with no network: the tiny byte-level BPE tokenizer and random tiny causal LMs
(Llama, Qwen2, GPT-NeoX) for tests and quick starts.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from tar_lightning.errors import ConfigError
from tar_lightning.models.sources import CONFIG_ERRORS

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "TINY_ARCHITECTURES",
    "tiny_llama",
    "tiny_model",
    "tiny_tokenizer",
    "tiny_tokenizer_json",
]

PAD, BOS, EOS = "<pad>", "<s>", "</s>"

# A fixed, in-code corpus the tiny byte-level BPE tokenizer is trained on. Any text still encodes (byte-level
# fallback); these words just get single tokens, which keeps tiny-model sequences short.
_TOKENIZER_WORDS = """
the of and to in is was for on that with as by at from it an be this are or which has had have not but were
his her their they she he its one all also can more first been other who after two new when some into time
most only over such than then them these there would about between during many may made state used under
city river language flag colour color export import north south east west old known called name named
pathogen virus bacteria host vector receptor incubation days protein gene cell cells tissue blood organism
infection disease spread transmitted through carries binds infects causes symptoms treatment dose doses
answer question questions following multiple choice choices about biology chemistry physics history
computer security science true false correct wrong yes no what which where how why because therefore
red green blue yellow black white orange purple grey gray silver gold brown pink
fact facts record records report reports study studies note notes says said writes written
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 24 30 32 48 64 100
user assistant system <|user|> <|assistant|> <|system|>
"""

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=4)
def tiny_tokenizer_json(vocab_size: int) -> str:
    """The tiny tokenizer's ``tokenizers`` JSON for ``vocab_size`` (trained once per size, then cached)."""
    tok = Tokenizer(tokenizer_models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _TOKENIZER_WORDS.split()
    # Each word both sentence-initial and after a space, repeated so every word is merged into one token.
    corpus = [" ".join(words)] * 8 + [w + " " + " ".join(words) for w in words[:64]]
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer built in code (no network), with pad/bos/eos tokens and a chat template.

    Deterministic: the same ``vocab_size`` always gives the same vocabulary.
    """
    backend = Tokenizer.from_str(tiny_tokenizer_json(vocab_size))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=4096
    )
    tok.chat_template = _CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


TINY_ARCHITECTURES = ("llama", "qwen2", "gpt_neox")


def tiny_model(arch: str = "llama", *, seed: int | None = 0, tokenizer=None, **overrides: Any):
    """Build a random tiny causal LM of the given architecture plus the tiny tokenizer, with no network.

    Args:
        arch: one of :data:`TINY_ARCHITECTURES`.
        seed: seeds the weight initialisation (``None`` leaves the global RNG untouched).
        tokenizer: a tokenizer to size the vocabulary for; the tiny tokenizer by default.
        **overrides: config fields (``hidden_size``, ``num_hidden_layers``, ...).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ConfigError: unknown architecture or config field.
    """
    if arch not in TINY_ARCHITECTURES:
        raise ConfigError(f"tiny model: unknown architecture {arch!r}; expected one of {TINY_ARCHITECTURES}")
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    base: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if arch in ("llama", "qwen2"):
        base["num_key_value_heads"] = 2
    reference = AutoConfig.for_model(arch)
    for key in overrides:
        if not hasattr(reference, key):
            raise ConfigError(f"tiny model: unknown config field {key!r} for architecture {arch!r}")
    # Passed to the constructor (not set afterwards) so derived fields follow: head_dim, layer_types, ...
    try:
        cfg = AutoConfig.for_model(arch, **{**base, **overrides})
    except CONFIG_ERRORS as err:
        raise ConfigError(f"tiny model: invalid config overrides {overrides} for {arch!r}: {err}") from err
    if seed is None:
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg)
    model.config.use_cache = False
    return model, tok


def tiny_llama(**overrides: Any):
    """A random 2-layer Llama (hidden 64) and the tiny tokenizer; see :func:`tiny_model`."""
    return tiny_model("llama", **overrides)
