"""``TARDataModule``: the named streams of one TAR outer step, deterministic and sharded per rank.

One training batch is one outer step: ``{stream: {"input_ids", "attention_mask", "labels"}}``, every tensor
shaped ``[n, b, L]`` where ``n`` is the number of micro-batches the module consumes from that stream per outer
step (``retain`` 1, ``tr`` T, adversary streams T*K), ``b`` the per-rank batch size and ``L`` the padded length.

Which records a bundle holds is a pure function of ``(seed, step, rank, world_size)``: global item
``g = s*b*W + r*b + j`` takes, for micro-batch ``m``, pool position ``p = g*n + m``, which is record
``perm_e[p % N]`` with ``e = p // N`` and ``perm_e`` a permutation seeded by ``(seed, stream name, e)``. So one
process with ``b=4`` and two with ``b=2`` see the same examples per step, and a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, Literal, Optional, Union

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from tar_lightning.common import is_int
from tar_lightning.data.preference import PreferenceSource, as_stream_source, preference_pool
from tar_lightning.data.sources import DataSource, as_source, load_records
from tar_lightning.data.tokenize import TokenPool, check_tokenizer, tokenize_records
from tar_lightning.errors import ConfigError
from tar_lightning.schema import int_at_least

__all__ = ["StepDataLoader", "StepDataset", "StepSampler", "TARDataModule", "ValDataset"]

log = logging.getLogger(__name__)

_PAD_MODES = ("longest", "max_length")


def stream_permutation(seed: int, name: str, epoch: int, size: int) -> np.ndarray:
    """The record permutation of pass ``epoch`` over a stream of ``size`` records (stable across processes)."""
    rng = np.random.default_rng([seed % 2**63, zlib.crc32(name.encode("utf-8")), epoch])
    return rng.permutation(size)


class StepDataset(Dataset):
    """Map-style dataset whose index is the global outer step; item ``s`` is this rank's bundle for step ``s``.

    Args:
        pools: tokenized examples per stream.
        stream_steps: micro-batches per outer step ``n`` for each stream to batch.
        batch_sizes: per-rank batch size ``b`` for each stream.
        seed: data seed.
        rank: this process's rank.
        world_size: number of processes.
        pad_id: the tokenizer's pad token id.
        pad_to: ``"longest"`` (longest sequence of the stream's bundle) or ``"max_length"`` (``seq_len``).
        seq_len: maximum sequence length.
    """

    _CACHE = 8

    def __init__(
        self,
        pools: Mapping[str, TokenPool],
        stream_steps: Mapping[str, int],
        batch_sizes: Mapping[str, int],
        seed: int,
        rank: int,
        world_size: int,
        pad_id: int,
        pad_to: str = "longest",
        seq_len: int = 256,
    ):
        int_at_least(1)(world_size, "world_size")
        int_at_least(0)(rank, "rank")
        if rank >= world_size:
            raise ConfigError(f"rank must be < world_size, got rank={rank}, world_size={world_size}")
        missing = [s for s in stream_steps if s not in pools or s not in batch_sizes]
        if missing:
            raise ConfigError(f"StepDataset: no pool or batch size for streams {missing}")
        self.pools = {name: pools[name] for name in stream_steps}
        self.stream_steps = dict(stream_steps)
        self.batch_sizes = {name: batch_sizes[name] for name in stream_steps}
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.pad_id = int(pad_id)
        self.pad_to = pad_to
        self.seq_len = seq_len
        self._perms: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_perms"] = OrderedDict()
        return state

    def _perm(self, name: str, epoch: int) -> np.ndarray:
        key = (name, epoch)
        perm = self._perms.get(key)
        if perm is None:
            perm = stream_permutation(self.seed, name, epoch, len(self.pools[name]))
            self._perms[key] = perm
            if len(self._perms) > self._CACHE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return perm

    def record_indices(self, name: str, step: int) -> np.ndarray:
        """Pool indices ``[n, b]`` of stream ``name`` in this rank's bundle of global step ``step``."""
        n, b, size = self.stream_steps[name], self.batch_sizes[name], len(self.pools[name])
        g = step * b * self.world_size + self.rank * b + np.arange(b, dtype=np.int64)
        positions = g[None, :] * n + np.arange(n, dtype=np.int64)[:, None]
        epochs = positions // size
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(name, int(e))[positions[sel] % size]
        return out

    def __getitem__(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        step = int(step)
        if step < 0:
            raise IndexError(f"outer step must be >= 0, got {step}")
        bundle = {}
        for name, n in self.stream_steps.items():
            idx = self.record_indices(name, step)
            pool = self.pools[name]
            width = self.seq_len if self.pad_to == "max_length" else int(pool.lengths[idx.reshape(-1)].max())
            if hasattr(pool, "bundle"):  # preference pairs: [n, 2b, L] (chosen rows, then rejected rows)
                bundle[name] = pool.bundle(idx, self.pad_id, width)
                continue
            flat = pool.collate(idx.reshape(-1).tolist(), self.pad_id, width)
            bundle[name] = {k: v.view(n, self.batch_sizes[name], width) for k, v in flat.items()}
        return bundle


class StepSampler(DistributedSampler):
    """Yields outer-step indices, one data epoch of ``S`` steps per pass, starting at ``start_step``.

    Pass ``k`` (the k-th ``iter()`` that is consumed) yields the steps of data epoch ``e = start_step // S + k``,
    i.e. ``e*S .. (e+1)*S - 1``, skipping steps before ``start_step``. Without a resume, pass ``k`` is epoch
    ``k``: ``0..S-1``, then ``S..2S-1``, ...

    The sampler counts its passes itself instead of trusting the epoch given to :meth:`set_epoch`: after a resume
    Lightning's epoch number need not match the data epoch (a checkpoint written when ``max_steps`` stopped a
    run mid-epoch counts that epoch as finished, so Lightning resumes in the next epoch number while data still
    has the rest of the interrupted epoch to play).

    It subclasses :class:`~torch.utils.data.distributed.DistributedSampler` only so that Lightning recognises it
    as already distributed and does not wrap it (the dataset shards by rank itself); it does not call the parent
    constructor, which needs a sized dataset and a process group.

    Args:
        steps_per_epoch: ``S``, outer steps per data epoch.
        start_step: first step to yield (resume).
        num_replicas: world size (informational; the dataset shards).
        rank: this rank (informational).
    """

    def __init__(self, steps_per_epoch: int, start_step: int = 0, num_replicas: int = 1, rank: int = 0):
        self.steps_per_epoch = int_at_least(1)(steps_per_epoch, "steps_per_epoch")
        self.start_step = int_at_least(0)(start_step, "start_step")
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.passes = 0
        self.shuffle = False
        self.drop_last = False
        self.seed = 0
        self.dataset = None
        self.num_samples = steps_per_epoch
        self.total_size = steps_per_epoch * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Record Lightning's epoch (informational; see the class docstring)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        # A generator: a pass is counted when its first step is requested, so an iterator that is created and
        # dropped unused (Lightning creates one per epoch) does not skip a data epoch.
        s = self.steps_per_epoch
        epoch = self.start_step // s + self.passes
        self.passes += 1
        yield from range(max(epoch * s, self.start_step), (epoch + 1) * s)

    def __len__(self) -> int:
        return self.steps_per_epoch


class StepDataLoader(DataLoader):
    """The training DataLoader; declares itself resumable so Lightning does not warn on mid-epoch resume.

    Lightning treats loaders with ``state_dict``/``load_state_dict`` as resumable. The position lives in
    :meth:`TARDataModule.state_dict` (restored before this loader is built), so the loader's own state is empty.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        return None


class ValDataset(Dataset):
    """Plain sequential examples of one validation stream (items are pool indices; the collate pads)."""

    def __init__(self, pool: TokenPool):
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < len(self.pool):
            raise IndexError(index)
        return int(index)


class _PadCollate:
    def __init__(self, pool: TokenPool, pad_id: int, length: Optional[int]):
        self.pool, self.pad_id, self.length = pool, pad_id, length

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.pool.collate(indices, self.pad_id, self.length)


class TARDataModule(lightning.LightningDataModule):
    """The data of TAR training: named streams, one bundle of micro-batches per outer step.

    Args:
        streams: data source per stream name (``retain``, ``tr``, ``forget``, ``retain_domain``, ...). Values may
            also be mappings of :class:`DataSource` fields or bare paths.
        seq_len: maximum tokens per example.
        batch_size: per-rank batch size of every stream.
        stream_batch_sizes: per-rank batch size overrides by stream name (train or val).
        seed: data seed (record order of every stream).
        pad_to: ``"longest"`` pads a stream's bundle to its longest example, ``"max_length"`` to ``seq_len``.
        num_workers: DataLoader workers.
        stream_steps: micro-batches per outer step per stream; by default asked from the LightningModule's
            ``stream_steps()`` in :meth:`setup`. Streams with 0 are not batched.
        steps_per_epoch: outer steps per epoch; default ``ceil(N_retain / (b_retain * world_size))``.
        tokenizer: by default the LightningModule's ``tokenizer`` attribute.
        val_streams: optional validation streams, batched as plain ``[b, L]`` batches in record order.
    """

    def __init__(
        self,
        streams: Mapping[str, Union[DataSource, Mapping, str]],
        seq_len: int = 256,
        batch_size: int = 8,
        stream_batch_sizes: Optional[dict[str, int]] = None,
        seed: int = 0,
        pad_to: Literal["longest", "max_length"] = "longest",
        num_workers: int = 0,
        stream_steps: Optional[dict[str, int]] = None,
        steps_per_epoch: Optional[int] = None,
        tokenizer: Any = None,
        val_streams: Optional[Mapping[str, Union[DataSource, Mapping, str]]] = None,
    ):
        super().__init__()
        if not isinstance(streams, Mapping) or not streams:
            raise ConfigError(
                f"TARDataModule: 'streams' must be a non-empty mapping of name -> source, got {streams!r}"
            )
        self.streams: dict[str, Any] = {
            str(k): as_stream_source(v, f"TARDataModule stream {k!r}") for k, v in streams.items()
        }
        if val_streams is not None and not isinstance(val_streams, Mapping):
            raise ConfigError(
                f"TARDataModule: 'val_streams' must be a mapping of name -> source, got {val_streams!r}"
            )
        self.val_streams: dict[str, DataSource] = {
            str(k): as_source(v, f"TARDataModule val stream {k!r}") for k, v in (val_streams or {}).items()
        }
        self.seq_len = int_at_least(2)(seq_len, "TARDataModule: 'seq_len'")
        self.batch_size = int_at_least(1)(batch_size, "TARDataModule: 'batch_size'")
        if stream_batch_sizes is not None and not isinstance(stream_batch_sizes, Mapping):
            raise ConfigError(
                f"TARDataModule: 'stream_batch_sizes' must map stream names to batch sizes, got {stream_batch_sizes!r}"
            )
        self.stream_batch_sizes = dict(stream_batch_sizes or {})
        known = set(self.streams) | set(self.val_streams)
        for name, b in self.stream_batch_sizes.items():
            if name not in known:
                raise ConfigError(
                    f"TARDataModule: 'stream_batch_sizes' names unknown stream {name!r}; configured streams: "
                    f"{sorted(known)}"
                )
            int_at_least(1)(b, f"TARDataModule: stream_batch_sizes[{name!r}]")
        if not is_int(seed):
            raise ConfigError(f"TARDataModule: 'seed' must be an integer, got {seed!r}")
        self.seed = seed
        if pad_to not in _PAD_MODES:
            raise ConfigError(f"TARDataModule: 'pad_to' must be one of {_PAD_MODES}, got {pad_to!r}")
        self.pad_to = pad_to
        self.num_workers = int_at_least(0)(num_workers, "TARDataModule: 'num_workers'")
        self._stream_steps_arg = self._check_stream_steps(stream_steps) if stream_steps is not None else None
        self.steps_per_epoch = (
            None
            if steps_per_epoch is None
            else int_at_least(1)(steps_per_epoch, "TARDataModule: 'steps_per_epoch'")
        )
        self.tokenizer = tokenizer

        self.stream_steps: Optional[dict[str, int]] = None
        self.pools: dict[str, TokenPool] = {}
        self.val_pools: dict[str, TokenPool] = {}
        self._pad_id: Optional[int] = None
        self._start_step = 0
        self._step_offset: Optional[int] = None
        self._offset_trainer: Any = None
        self._sampler: Optional[StepSampler] = None

    # ------------------------------------------------------------------------------------------ config
    @staticmethod
    def _check_stream_steps(steps: Any) -> dict[str, int]:
        if not isinstance(steps, Mapping):
            raise ConfigError(
                f"stream_steps must be a mapping of stream name -> micro-batches, got {steps!r}"
            )
        return {str(k): int_at_least(0)(v, f"stream_steps[{k!r}]") for k, v in steps.items()}

    def batch_size_of(self, name: str) -> int:
        """Per-rank batch size of a stream."""
        return int(self.stream_batch_sizes.get(name, self.batch_size))

    def _module(self) -> Any:
        trainer = getattr(self, "trainer", None)
        return getattr(trainer, "lightning_module", None) if trainer is not None else None

    def _resolve_tokenizer(self) -> Any:
        tok = self.tokenizer
        if tok is None:
            tok = getattr(self._module(), "tokenizer", None)
        if tok is None:
            raise ConfigError(
                "TARDataModule needs a tokenizer: pass tokenizer=... or attach it to a LightningModule that has a "
                "'tokenizer' attribute"
            )
        check_tokenizer(tok, "TARDataModule")
        return tok

    def _resolve_stream_steps(self) -> dict[str, int]:
        if self._stream_steps_arg is not None:
            steps = self._stream_steps_arg
        else:
            fn = getattr(self._module(), "stream_steps", None)
            if not callable(fn):
                raise ConfigError(
                    "TARDataModule needs the micro-batches per outer step of each stream: pass stream_steps=... "
                    "or attach it to a LightningModule with a stream_steps() method"
                )
            steps = self._check_stream_steps(fn())
        required = [k for k, v in steps.items() if v > 0]
        missing = [k for k in required if k not in self.streams]
        if missing:
            raise ConfigError(
                f"TARDataModule: the module needs data streams {missing} that are not configured; configured "
                f"streams: {sorted(self.streams)} (add them under 'streams')"
            )
        extra = [k for k in self.streams if k not in required]
        if extra:
            log.info(
                "TARDataModule: configured streams %s are not used by the module and will not be batched",
                extra,
            )
        # Batch in configuration order, so bundles list streams the way the recipe does.
        return {k: steps[k] for k in self.streams if k in required}

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        """Tokenize the streams needed by ``stage`` (once; later calls reuse the pools)."""
        need_train = stage in (None, "fit") and self.stream_steps is None
        need_val = stage in (None, "fit", "validate") and bool(self.val_streams) and not self.val_pools
        if not (need_train or need_val):
            return
        tokenizer = self._resolve_tokenizer()
        self._pad_id = int(tokenizer.pad_token_id)
        if need_train:
            steps = self._resolve_stream_steps()
            self.pools = {name: self._tokenize(self.streams[name], tokenizer) for name in steps}
            self.stream_steps = steps
            for name, pool in self.pools.items():
                log.info("TARDataModule: stream %r: %d records, %d tokens", name, len(pool), pool.num_tokens)
        if need_val:
            self.val_pools = {name: self._tokenize(src, tokenizer) for name, src in self.val_streams.items()}

    def _tokenize(self, source: DataSource, tokenizer: Any) -> TokenPool:
        if isinstance(source, PreferenceSource):
            return self._preference_pool(source, tokenizer)
        return TokenPool(tokenize_records(load_records(source), source, tokenizer, self.seq_len))

    def _preference_pool(self, source: PreferenceSource, tokenizer: Any) -> Any:
        """A preference stream's pool; reference log-probs come from the attached module's (starting) model."""
        model = getattr(self._module(), "model", None)
        return preference_pool(source, tokenizer, self.seq_len, model=model)

    def _require_setup(self) -> None:
        if self.stream_steps is None:
            self.setup("fit")

    # ------------------------------------------------------------------------------------------ train
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_dataset(self, rank: int = 0, world_size: int = 1) -> StepDataset:
        """The step-indexed dataset of one rank (``dataset[s]`` is that rank's bundle of outer step ``s``)."""
        self._require_setup()
        assert self.stream_steps is not None and self._pad_id is not None
        return StepDataset(
            self.pools,
            self.stream_steps,
            {name: self.batch_size_of(name) for name in self.stream_steps},
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            pad_id=self._pad_id,
            pad_to=self.pad_to,
            seq_len=self.seq_len,
        )

    def steps_per_epoch_for(self, world_size: int = 1) -> int:
        """Outer steps per epoch: ``steps_per_epoch``, or one pass over the retain stream's records."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        self._require_setup()
        assert self.stream_steps is not None
        ref = "retain" if "retain" in self.stream_steps else next(iter(self.stream_steps))
        per_step = self.stream_steps[ref] * self.batch_size_of(ref) * world_size
        return max(1, math.ceil(len(self.pools[ref]) / per_step))

    def _processed_batches(self) -> Optional[int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        try:
            return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
        except AttributeError:
            return int(trainer.global_step)

    def train_dataloader(self) -> StepDataLoader:
        """One bundle per outer step for this rank; rank and world size are read from the trainer now."""
        rank, world = self._rank_world()
        dataset = self.train_dataset(rank, world)
        trainer = getattr(self, "trainer", None)
        processed = self._processed_batches()
        if processed is not None and self._step_offset is not None and self._offset_trainer is trainer:
            # Rebuilt during the same fit (reload_dataloaders_every_n_epochs, or fit called again): continue.
            start = processed + self._step_offset
        else:
            start = self._start_step
            # Batches Lightning restores from a checkpoint already count in its progress; a start step set by
            # hand (load_state_dict without a checkpoint) does not: remember the difference for state_dict().
            self._step_offset = None if processed is None else start - processed
            self._offset_trainer = trainer
        self._sampler = StepSampler(
            self.steps_per_epoch_for(world), start_step=start, num_replicas=world, rank=rank
        )
        return StepDataLoader(
            dataset,
            batch_size=None,
            sampler=self._sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    # ------------------------------------------------------------------------------------------ val
    def val_dataloader(self) -> list[DataLoader]:
        """One sequential ``[b, L]`` DataLoader per validation stream (in configuration order); ``[]`` if none."""
        if not self.val_streams:
            return []
        if not self.val_pools:
            self.setup("validate")
        assert self._pad_id is not None
        length = self.seq_len if self.pad_to == "max_length" else None
        return [
            DataLoader(
                ValDataset(pool),
                batch_size=self.batch_size_of(name),
                shuffle=False,
                collate_fn=_PadCollate(pool, self._pad_id, length),
                num_workers=self.num_workers,
            )
            for name, pool in self.val_pools.items()
        ]

    @property
    def val_stream_names(self) -> list[str]:
        """Names of the validation streams, in ``dataloader_idx`` order."""
        return list(self.val_streams)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, int]:
        """``{"next_step": outer steps (training batches) consumed}``; saved by Lightning in checkpoints."""
        processed = self._processed_batches()
        if processed is not None and self._step_offset is not None:
            return {"next_step": int(processed + self._step_offset)}
        return {"next_step": int(self._start_step)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue with outer step ``state_dict["next_step"]`` (the next train dataloader starts there)."""
        if not isinstance(state_dict, Mapping) or "next_step" not in state_dict:
            raise ConfigError(
                f"TARDataModule.load_state_dict: expected {{'next_step': int}}, got {state_dict!r}"
            )
        self._start_step = int_at_least(0)(state_dict["next_step"], "TARDataModule state 'next_step'")
        self._step_offset = None
        self._offset_trainer = None

    # ------------------------------------------------------------------------------------------ logging
    def describe(self) -> dict[str, dict[str, Any]]:
        """Per stream: records (and tokens, batch size, micro-batches once set up), for logging.

        Validation streams are keyed ``"val/<name>"``. Before :meth:`setup` only record counts are reported
        (read from the sources).
        """
        out: dict[str, dict[str, Any]] = {}
        for name, src in self.streams.items():
            info: dict[str, Any] = {"source": src.path, "batch_size": self.batch_size_of(name)}
            if name in self.pools:
                pool = self.pools[name]
                info.update(records=len(pool), tokens=pool.num_tokens)
                info["micro_batches"] = self.stream_steps[name] if self.stream_steps else None
            elif self.stream_steps is not None:
                info.update(records=None, micro_batches=0)  # configured but not used by the module
            elif isinstance(src, PreferenceSource):
                info["records"] = None  # counted when tokenized (pairs are joined and filtered first)
            else:
                info["records"] = len(load_records(src))
            out[name] = info
        for name, src in self.val_streams.items():
            info = {"source": src.path, "batch_size": self.batch_size_of(name)}
            if name in self.val_pools:
                info.update(records=len(self.val_pools[name]), tokens=self.val_pools[name].num_tokens)
            else:
                info["records"] = len(load_records(src))
            out[f"val/{name}"] = info
        return out
