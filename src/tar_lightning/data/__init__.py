"""Data for TAR training and evaluation: sources, readers, tokenization and the step-indexed datamodule."""

from tar_lightning.data.datamodule import (
    StepDataset,
    StepSampler,
    TARDataModule,
    ValDataset,
    stream_permutation,
)
from tar_lightning.data.sources import DataSource, as_source, load_records, select_range
from tar_lightning.data.synthetic import SYNTHETIC_DOMAINS, synthetic_records, synthetic_texts
from tar_lightning.data.tokenize import (
    IGNORE_INDEX,
    TokenPool,
    check_tokenizer,
    tokenize_records,
    tokenize_source,
)

__all__ = [
    "IGNORE_INDEX",
    "SYNTHETIC_DOMAINS",
    "DataSource",
    "StepDataset",
    "StepSampler",
    "TARDataModule",
    "TokenPool",
    "ValDataset",
    "as_source",
    "check_tokenizer",
    "load_records",
    "select_range",
    "stream_permutation",
    "synthetic_records",
    "synthetic_texts",
    "tokenize_records",
    "tokenize_source",
]
