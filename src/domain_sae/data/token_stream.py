"""From a :class:`~domain_sae.config.DataConfig` to fixed-length token sequences.

    documents = open_source(cfg.data, split=cfg.data_split, column=cfg.data_column, streaming=cfg.streaming)
             -> the first cfg.max_rows documents (BEFORE the split, so max_rows never changes which documents are
                held out; empty rows, which the source skips, are not counted)
             -> drop duplicates (``cfg.deduplicate``: exact and whitespace-normalised copies, first one kept;
                ``splits.Deduplicator``; a duplicate always falls on the same side of the split as its original)
             -> keep the documents of the requested split (``splits.is_heldout(doc, cfg.holdout_fraction)``)
             -> tokenize (``formatting.tokenize_documents``, in batches)
             -> pack to cfg.context_size (``packing.pack``)

:class:`TokenStream` yields ``(input_ids LongTensor[ctx], segments Int8Tensor[ctx])``. :func:`heldout_batch` is the
one entry point for evaluation tokens (in-training evaluation, ``dsae eval``, the study, the feature store): it
returns the :class:`~domain_sae.data.sampling.HeldoutSample` of :func:`~domain_sae.data.sampling.sample_heldout`
(windows drawn from many documents across the whole held-out split), which unpacks as ``input_ids, segments``.
"""

from __future__ import annotations

import warnings
from itertools import islice
from typing import Iterator, Optional

import torch

from ..util.hf import max_context
from .formatting import bos_token_id, tokenize_documents
from .packing import pack
from .sampling import HeldoutSample, sample_windows
from .sources import DataError, Document, DocumentSource, open_source
from .splits import Deduplicator, document_digest, score_of_digest

__all__ = ["TokenStream", "heldout_batch", "check_context_size", "SPLITS"]

SPLITS = ("train", "heldout")
_MAX_TOKENIZE_BATCH = 64


class TokenStream:
    """Iterable of ``(input_ids [ctx], segments [ctx])`` for one split of ``cfg.data``.

    Every ``iter()`` starts from the beginning of the split, after the sequences passed to :meth:`skip`.
    With ``repeat=True`` the stream starts over when the split is exhausted (a warning per new epoch gives the
    epoch's token count); ``epochs`` counts the completed passes. A split that yields no sequence at all raises
    :class:`DataError` (with or without ``repeat``).
    """

    def __init__(self, cfg, tokenizer, *, split: str = "train", repeat: bool = False,
                 source: Optional[DocumentSource] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (got {split!r}).")
        if split == "heldout" and cfg.holdout_fraction <= 0:
            raise DataError(f"The held-out split of {cfg.data!r} is empty because holdout_fraction is "
                            f"{cfg.holdout_fraction}; raise holdout_fraction (e.g. 0.05) to evaluate.")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.split = split
        self.repeat = repeat
        self.source = source if source is not None else open_source(
            cfg.data, split=cfg.data_split, column=cfg.data_column, streaming=cfg.streaming)
        self.bos_id = bos_token_id(tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.bos_id if self.bos_id is not None else 0)
        if cfg.prepend_bos and self.bos_id is None:
            raise DataError("The tokenizer has neither a BOS nor an EOS token to start documents with; set "
                            "prepend_bos to false.")
        self.epochs = 0
        self._skip = 0
        self.duplicates_removed = 0  # in the last (or current) pass over the documents

    @property
    def description(self) -> str:
        rows = f", first {self.cfg.max_rows} documents" if self.cfg.max_rows else ""
        return f"{self.split} split of {self.source.description}{rows}"

    def skip(self, n_sequences: int) -> None:
        """Leave out the first ``n_sequences`` sequences of the next iteration (resuming)."""
        if n_sequences < 0:
            raise ValueError(f"Cannot skip a negative number of sequences ({n_sequences}).")
        self._skip += int(n_sequences)

    def keyed_documents(self) -> Iterator[tuple[bytes, Document]]:
        """``(digest, document)`` of the split's documents: the first ``max_rows`` documents of the source, minus
        duplicates (``cfg.deduplicate``; counted in ``duplicates_removed``), then the split filter."""
        rows = iter(self.source)
        if self.cfg.max_rows is not None:
            rows = islice(rows, self.cfg.max_rows)
        want_heldout = self.split == "heldout"
        dedup = Deduplicator() if self.cfg.deduplicate else None
        self.duplicates_removed = 0
        for doc in rows:
            digest = document_digest(doc)
            if dedup is not None:
                if not dedup.keep(digest):
                    self.duplicates_removed = dedup.removed
                    continue
            held = self.cfg.holdout_fraction > 0 and score_of_digest(digest) < self.cfg.holdout_fraction
            if held == want_heldout:
                yield digest, doc

    def documents(self) -> Iterator[Document]:
        """The split's documents (see :meth:`keyed_documents`)."""
        for _, doc in self.keyed_documents():
            yield doc

    def tokenized(self) -> Iterator[tuple[list[int], list[int]]]:
        """``(ids, segments)`` per document, tokenized in batches of 4, 8, ... up to 64 documents (small first
        batches keep a short read, e.g. a held-out batch, cheap)."""
        batch: list[Document] = []
        size = 4
        for doc in self.documents():
            batch.append(doc)
            if len(batch) >= size:
                yield from tokenize_documents(batch, self.tokenizer, self.cfg.prepend_bos)
                batch = []
                size = min(2 * size, _MAX_TOKENIZE_BATCH)
        if batch:
            yield from tokenize_documents(batch, self.tokenizer, self.cfg.prepend_bos)

    def _one_pass(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return pack(self.tokenized(), self.cfg.context_size, bos_id=self.bos_id, pad_id=self.pad_id,
                    prepend_bos=self.cfg.prepend_bos,
                    one_document_per_sequence=self.cfg.one_document_per_sequence)

    def _empty_error(self) -> DataError:
        if self.split == "heldout":
            return DataError(f"The held-out split of {self.source.description} gives no sequence of "
                             f"{self.cfg.context_size} tokens (holdout_fraction={self.cfg.holdout_fraction}, "
                             f"max_rows={self.cfg.max_rows}); raise holdout_fraction or max_rows, or lower "
                             f"context_size.")
        return DataError(f"The training split of {self.source.description} gives no sequence of "
                         f"{self.cfg.context_size} tokens (max_rows={self.cfg.max_rows}, holdout_fraction="
                         f"{self.cfg.holdout_fraction}); use more data (raise max_rows) or lower context_size.")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        to_skip = self._skip
        while True:
            n_seq = 0
            for ids, segs in self._one_pass():
                n_seq += 1
                if to_skip:
                    to_skip -= 1
                    continue
                yield ids, segs
            if n_seq == 0:
                raise self._empty_error()
            self.epochs += 1
            if not self.repeat:
                return
            warnings.warn(f"The {self.description} is exhausted after {n_seq * self.cfg.context_size} tokens "
                          f"({n_seq} sequences of {self.cfg.context_size}); starting epoch {self.epochs + 1} (the "
                          f"data repeats). Use more data to avoid training on the same tokens again.",
                          stacklevel=2)

    def __repr__(self) -> str:
        return f"TokenStream({self.description}, context_size={self.cfg.context_size})"


def heldout_batch(cfg, tokenizer, n_tokens: int, *, source: Optional[DocumentSource] = None) -> HeldoutSample:
    """Evaluation tokens of ``cfg.data``'s held-out split: a :class:`~domain_sae.data.sampling.HeldoutSample`
    (``input_ids [N, ctx]``, ``segments``, ``doc_ids``, ``n_documents``, ...; ``ids, segs = heldout_batch(...)``
    still works) of ``N = ceil(n_tokens / context_size)`` windows drawn from many documents across the whole split
    (:mod:`~domain_sae.data.sampling`: seeded by ``cfg.heldout_seed``, at most ``cfg.heldout_tokens_per_document``
    tokens per document). Deterministic; fewer windows (with a warning) when the split is smaller;
    :class:`DataError` when it gives none. Reads the source until ``cfg.heldout_max_documents`` held-out documents
    were found (or to its end, bounded by ``max_rows``)."""
    stream = TokenStream(cfg, tokenizer, split="heldout", repeat=False, source=source)
    return sample_windows(stream.keyed_documents(), tokenizer, n_tokens=n_tokens, context_size=cfg.context_size,
                          bos_id=stream.bos_id, pad_id=stream.pad_id, prepend_bos=cfg.prepend_bos,
                          one_document_per_sequence=cfg.one_document_per_sequence,
                          max_tokens_per_document=cfg.heldout_tokens_per_document, seed=cfg.heldout_seed,
                          duplicates_removed=lambda: stream.duplicates_removed, description=stream.description,
                          max_documents=cfg.heldout_max_documents)


def check_context_size(cfg, model) -> None:
    """:class:`DataError` when ``cfg.context_size`` exceeds the model's maximum number of positions."""
    limit = max_context(model)
    if limit is not None and cfg.context_size > limit:
        raise DataError(f"context_size {cfg.context_size} is larger than the model's maximum of {limit} positions; "
                        f"set --context-size {limit} or less.")
