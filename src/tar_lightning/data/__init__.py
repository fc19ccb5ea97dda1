"""Data for TAR training and evaluation: sources, readers, tokenization and the step-indexed datamodule."""

from tar_lightning.data.datamodule import (
    StepDataset,
    StepSampler,
    TARDataModule,
    ValDataset,
    stream_permutation,
)
from tar_lightning.data.knowledge import (
    KNOWLEDGE_MCQ_SPLITS,
    KNOWLEDGE_SPLITS,
    KnowledgeWorld,
    build_world,
    knowledge_mcq,
    knowledge_records,
    write_mcq_files,
    write_mcq_json,
)
from tar_lightning.data.preference import PreferencePool, PreferenceSource, load_pairs, preference_pool
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
    "KNOWLEDGE_MCQ_SPLITS",
    "KNOWLEDGE_SPLITS",
    "SYNTHETIC_DOMAINS",
    "DataSource",
    "KnowledgeWorld",
    "PreferencePool",
    "PreferenceSource",
    "StepDataset",
    "StepSampler",
    "TARDataModule",
    "TokenPool",
    "ValDataset",
    "as_source",
    "build_world",
    "check_tokenizer",
    "knowledge_mcq",
    "knowledge_records",
    "load_pairs",
    "load_records",
    "preference_pool",
    "select_range",
    "stream_permutation",
    "synthetic_records",
    "synthetic_texts",
    "tokenize_records",
    "tokenize_source",
    "write_mcq_files",
    "write_mcq_json",
]
