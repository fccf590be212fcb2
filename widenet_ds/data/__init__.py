"""The pretraining data pipeline: corpus -> tokenizer -> cached instances -> masked batches.

Typical use (the pretraining job does all of this through ``prepare_pretraining_data(args, ...)``)::

    corpus = Corpus(["books/*.txt"])
    tokenizer = train_tokenizer(corpus, "runs/tokenizer", vocab_size=30_000)
    cache = build_pretraining_cache(corpus, tokenizer, "runs/cache", PreprocessConfig(max_seq_length=512))
    collator = PretrainingCollator.from_tokenizer(tokenizer, seed=1)
    loader, sampler = make_pretraining_dataloader(cache.dataset("train"), collator, batch_size=32, seed=1)
"""

from .cache import PreprocessConfig, PretrainingCache, build_pretraining_cache
from .corpus import (
                     LINE_DATASETS,
                     Corpus,
                     CorpusError,
                     CorpusFormat,
                     CorpusStats,
                     Document,
                     HubSource,
                     check_sources,
                     split_sentences,
)
from .dataset import CacheError, PretrainingCollator, PretrainingDataset
from .loader import PretrainingLoader, make_pretraining_dataloader
from .pipeline import PretrainingData, prepare_pretraining_data, write_stdlib_docstrings
from .pretraining import (
                     IGNORE_INDEX,
                     Instance,
                     create_instances,
                     mask_tokens,
                     select_masked_spans,
)
from .sampler import ResumableDistributedSampler
from .tokenizer import TokenizerError, load_tokenizer, train_tokenizer

__all__ = [
    "IGNORE_INDEX", "LINE_DATASETS", "CacheError", "Corpus", "CorpusError", "CorpusFormat", "CorpusStats", "Document",
    "HubSource", "Instance", "PreprocessConfig", "PretrainingCache", "PretrainingCollator", "PretrainingData",
    "PretrainingDataset", "PretrainingLoader", "ResumableDistributedSampler", "TokenizerError",
    "build_pretraining_cache", "check_sources", "create_instances", "load_tokenizer", "make_pretraining_dataloader",
    "mask_tokens", "prepare_pretraining_data", "select_masked_spans", "split_sentences", "train_tokenizer",
    "write_stdlib_docstrings",
]
