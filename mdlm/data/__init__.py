"""mdlm.data: tokenizers, detokenizers, token shards, a resumable batch sampler and named datasets.

- ``get_tokenizer(name)``: GPT-2 / BERT uncased / text8 from local files, with the MDLM special ids
- ``detokenizers``: the published WikiText / PTB / LM1B / LAMBADA / scientific-papers detokenizers
- ``build_shards(...) -> BlockDataset``: tokenise once into ``tokens.bin`` + ``meta.json`` (wrap or pad mode)
- ``BlockDataset``: zero-copy blocks (n_blocks, length) with attention masks
- ``ResumableBatchSampler``: micro-batches as a pure function of (seed, global index), world-size independent
- ``prepare_dataset(name, split) -> BlockDataset``: named datasets (local and Hugging Face), cached

The original helpers (``data_dir``, ``gpt2_tokenizer``, ``wrap_chunks``, ``load_corpus_tokens``, ``decode``,
``GPT2_EOS``, ``GPT2_VOCAB``) are re-exported unchanged.
"""
from ._local import GPT2_EOS, GPT2_VOCAB, data_dir, decode, gpt2_tokenizer, load_corpus_tokens, wrap_chunks
from . import detokenizers
from .detokenizers import get_detokenizer
from .tokenizers import TOKENIZERS, Tokenizer, get_tokenizer
from .shards import BlockDataset, TextFile, build_shards
from .loader import ResumableBatchSampler, epoch_seed
from .datasets import DATASETS, DatasetSpec, default_cache_dir, prepare_dataset

__all__ = ["data_dir", "gpt2_tokenizer", "GPT2_EOS", "GPT2_VOCAB", "wrap_chunks", "load_corpus_tokens", "decode",
           "Tokenizer", "get_tokenizer", "TOKENIZERS", "detokenizers", "get_detokenizer",
           "build_shards", "BlockDataset", "TextFile", "ResumableBatchSampler", "epoch_seed",
           "DATASETS", "DatasetSpec", "prepare_dataset", "default_cache_dir"]
