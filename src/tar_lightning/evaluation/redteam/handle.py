"""The model under attack: a base that is never modified, fresh copies per run, quantized reloads.

:class:`ModelHandle` loads (or takes) the base once, names it for the result files (``identity``), hands each
run a fresh copy on the run's device, reloads it 4-/8-bit from a folder for QLoRA attacks
(:func:`tar_lightning.models.quantized.load_quantized`), exporting a module to a folder first when needed.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tar_lightning.adversaries.config import AdversaryConfig
from tar_lightning.common import model_fingerprint
from tar_lightning.errors import ConfigError
from tar_lightning.evaluation.progress import quiet_hf_progress
from tar_lightning.models import ModelSource, export_pretrained, load_model
from tar_lightning.models.quantized import load_quantized

__all__ = ["ModelHandle"]


class ModelHandle:
    """The model under attack: a base that is never modified, fresh copies per run, quantized reloads.

    Args:
        model: a model source (path, hub id, alias, ``tiny``), a :class:`ModelSource`, or a module (then
            ``tokenizer`` is required).
        tokenizer: the tokenizer (default: the source's).
        device: where fresh copies are put.
        work_dir: where a module is exported when a quantized reload needs a folder (removed by :meth:`close`).

    Raises:
        ConfigError: a module without a tokenizer, or a model of another type.
        ModelLoadError: the source cannot be loaded.
    """

    def __init__(self, model: Any, tokenizer: Any, device: str, work_dir: Path) -> None:
        self.device = device
        self.work_dir = work_dir
        self._folder: Optional[str] = None
        self._tmp: Optional[str] = None
        if isinstance(model, (str, os.PathLike, ModelSource)):
            spec = model if isinstance(model, ModelSource) else ModelSource(os.fspath(model))
            with quiet_hf_progress(unless_terminal=True):  # transformers' loading bar: escape codes in a log file
                self.base, tok = load_model(spec)
            self.tokenizer = tokenizer if tokenizer is not None else tok
            self.source: Optional[ModelSource] = spec
            identity: dict[str, Any] = {"source": spec.source, "dtype": spec.dtype, "seed": spec.seed}
            if spec.overrides:
                identity["overrides"] = spec.overrides
            if spec.kind == "local":
                path = Path(os.path.expanduser(spec.source))
                files = sorted(
                    p for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".gguf", ".json")
                )
                identity["files"] = [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]
                if (path / "config.json").is_file():
                    self._folder = str(path)
            elif spec.kind == "hub":
                self._folder = spec.source
            self.identity = identity
        elif isinstance(model, nn.Module):
            if tokenizer is None:
                raise ConfigError(
                    "run_redteam: a model given as an nn.Module needs its tokenizer (tokenizer=...)"
                )
            self.base, self.tokenizer, self.source = model, tokenizer, None
            self.identity = {"module": type(model).__name__, "weights": model_fingerprint(model)}
        else:
            raise ConfigError(
                "run_redteam: model must be a source (path, hub id, alias, 'tiny'), a ModelSource or an "
                f"nn.Module, got {type(model).__name__}"
            )
        first = next(iter(self.base.parameters()), None)
        self.dtype = first.dtype if first is not None else torch.float32

    def fresh(self, adversary: AdversaryConfig) -> nn.Module:
        """A new copy of the base for one attack, on the device, every weight trainable."""
        if adversary.method == "lora" and adversary.lora.quantize_base is not None:
            with quiet_hf_progress():
                return load_quantized(self.folder(), adversary.lora.quantize_base, self.dtype, self.device)
        model = copy.deepcopy(self.base).to(self.device)
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
            p.grad = None
        return model

    def folder(self) -> str:
        """A Hugging Face folder (or hub id) holding the base weights; exported once when needed."""
        if self._folder is None:
            self._tmp = tempfile.mkdtemp(prefix=".base_model-", dir=self.work_dir)
            with quiet_hf_progress():
                self._folder = str(export_pretrained(self.base, self.tokenizer, Path(self._tmp) / "model"))
        return self._folder

    def close(self) -> None:
        """Removes the exported folder, if any."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self._folder = None
