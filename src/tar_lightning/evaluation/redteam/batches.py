"""Seeds and attack batches: what makes one red-team run (or one TamperProbe attack) reproducible.

- :func:`run_seed`: the seed of a run, a pure function of ``(suite seed, attack id, seed)``;
- :func:`seeded`: seeds torch, numpy and random for a block and restores their states afterwards;
- :class:`AttackBatches`: seeded, shuffled batches of an attack's data streams;
- :class:`DataCache`: a suite's data regimes, tokenized once per red team.
"""

from __future__ import annotations

import contextlib
import logging
import random
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, Union

import numpy as np
import torch

from tar_lightning.data.datamodule import stream_permutation
from tar_lightning.data.sources import DataSource, load_records
from tar_lightning.data.tokenize import TokenPool, check_tokenizer, tokenize_records
from tar_lightning.errors import ConfigError

__all__ = ["AttackBatches", "DataCache", "run_seed", "seeded"]

log = logging.getLogger(__name__)


def run_seed(suite_seed: int, attack_id: str, seed: int) -> int:
    """The seed of one run: a 63-bit integer, a pure function of its arguments (stable across processes)."""
    state = np.random.SeedSequence(
        [int(suite_seed) % 2**63, zlib.crc32(attack_id.encode()), int(seed) % 2**63]
    )
    hi, lo = state.generate_state(2, dtype=np.uint32)
    return (int(hi) << 31 | int(lo) >> 1) & (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seeds torch, numpy and random for the block and restores their previous states afterwards.

    The red team runs every attack (model copy, evaluations, the attack) inside ``seeded(run_seed)``;
    :class:`~tar_lightning.callbacks.TamperProbe` does the same for each probe, so the global random state is
    the same after a probe as before it.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class AttackBatches:
    """Seeded, shuffled batches of the attack's data streams.

    Every stream is read in passes; pass ``e`` visits the stream's examples in the order
    ``stream_permutation(seed, stream, e, N)`` (the data module's permutation), ``batch_size`` examples per
    step, each stream with its own cursor (a retain→forget attack does not skip forget examples while it
    trains on retain text). A regime of 10 examples is thus seen for many epochs. Batches are right-padded to
    their longest example.

    Args:
        pools: tokenized examples per stream name.
        batch_size: examples per batch.
        seed: the run's seed.
        pad_id: the tokenizer's pad token id.
        device: where batches are put.
    """

    def __init__(
        self,
        pools: Mapping[str, TokenPool],
        batch_size: int,
        seed: int,
        pad_id: int,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.pools = dict(pools)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.pad_id = int(pad_id)
        self.device = device
        self.cursor = {name: 0 for name in self.pools}
        self._perm: dict[str, tuple[int, np.ndarray]] = {}

    def indices(self, stream: str) -> list[int]:
        """Pool indices of the next batch of ``stream`` (advances its cursor)."""
        if stream not in self.pools:
            raise ConfigError(f"attack data: no stream {stream!r}; streams: {sorted(self.pools)}")
        n = len(self.pools[stream])
        out = []
        for p in range(self.cursor[stream], self.cursor[stream] + self.batch_size):
            epoch = p // n
            cached = self._perm.get(stream)
            if cached is None or cached[0] != epoch:
                cached = (epoch, stream_permutation(self.seed, stream, epoch, n))
                self._perm[stream] = cached
            out.append(int(cached[1][p % n]))
        self.cursor[stream] += self.batch_size
        return out

    def next(self, stream: str) -> dict[str, torch.Tensor]:
        """The next batch ``{input_ids, attention_mask, labels}`` of ``stream``."""
        indices = self.indices(stream)
        batch = self.pools[stream].collate(indices, self.pad_id)
        if self.device is not None:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch


class DataCache:
    """Tokenized data regimes of a suite, built once per red team (per process).

    Args:
        regimes: the suite's data regimes, name -> source.
        tokenizer: the model's tokenizer.
        seq_len: tokens per example.
    """

    def __init__(self, regimes: Mapping[str, DataSource], tokenizer: Any, seq_len: int) -> None:
        check_tokenizer(tokenizer, "red team")
        self.regimes = dict(regimes)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self._pools: dict[str, TokenPool] = {}

    def pool(self, name: str) -> TokenPool:
        """The tokenized examples of regime ``name`` (read and tokenized on first use)."""
        if name not in self._pools:
            if name not in self.regimes:
                raise ConfigError(f"red team: no data regime {name!r}; regimes: {sorted(self.regimes)}")
            source = self.regimes[name]
            records = load_records(source)
            self._pools[name] = TokenPool(tokenize_records(records, source, self.tokenizer, self.seq_len))
            log.info("red team: data regime %r: %d examples", name, len(self._pools[name]))
        return self._pools[name]
