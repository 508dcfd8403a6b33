"""Mixtures of document sources with stated proportions: the built-in ``general`` corpus and ``mix:`` specs.

``general`` is :data:`GENERAL_MIXTURE`: prose 40%, chat 30%, code 30%. ``mix:prose=2,chat=1,code=1`` is any
mixture of data specs (built-in names, files, directories, hub ids; weights are normalised to sum to 1; a spec may
not contain ``,`` or ``=``, and mixtures do not nest).

Document level (``--data general``): the parts are interleaved deterministically so that each part's share of the
CHARACTERS emitted so far follows its weight. Before each document the part with the smallest
``chars_emitted_i / w_i`` is chosen (ties: the first listed), so after any prefix every part's share of the
characters is within one document of ``w_i``. A document's size is its text length, the summed content length of
its messages, or 4 per token id. The stream ends when the chosen part runs out, so the proportions hold over the
whole stream (in the default mixture the prose part, 12.2M characters at weight 0.4, ends it after about 30M
characters; ``TokenStream(repeat=True)`` starts it again). Characters are not tokens: the SmolLM2 tokenizer reads
about 5.0 characters per token of prose, 3.9 of chat content and 3.1 of code (measured on the first 300 documents
of each), so by tokens the default mixture is about prose 31%, chat 30%, code 38%.

Activation level (the study): each domain is cached on its own and every training batch takes
:func:`weighted_shares` of its tokens from each domain, so the TOKEN proportions are exact at every step.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, Optional

from .documents import DataError, Document, DocumentSource

__all__ = ["GENERAL_MIXTURE", "MIX_PREFIX", "parse_mixture", "document_chars", "interleave", "mixture_source",
           "mixture_from_spec", "weighted_shares", "describe_mixture"]

#: The study's general corpus: name -> weight (fraction of characters at document level, of tokens in the study).
GENERAL_MIXTURE: dict[str, float] = {"prose": 0.4, "chat": 0.3, "code": 0.3}
MIX_PREFIX = "mix:"


def _normalise(weights: Mapping[str, float], where: str) -> dict[str, float]:
    if len(weights) < 1:
        raise DataError(f"The mixture {where} names no part; write e.g. mix:prose=0.4,chat=0.3,code=0.3.")
    bad = {k: w for k, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)}
    if bad:
        raise DataError(f"Mixture weights must be positive numbers; {where} has {bad}.")
    total = float(sum(weights.values()))
    return {k: float(w) / total for k, w in weights.items()}


def parse_mixture(spec: str) -> dict[str, float]:
    """``general`` -> :data:`GENERAL_MIXTURE`; ``mix:a=w1,b=w2`` -> ``{a: w1/(w1+w2), b: w2/(w1+w2)}``."""
    if spec == "general":
        return dict(GENERAL_MIXTURE)
    if not spec.startswith(MIX_PREFIX):
        raise DataError(f"{spec!r} is not a mixture spec; write general or mix:prose=0.4,chat=0.3,code=0.3.")
    weights: dict[str, float] = {}
    for item in spec[len(MIX_PREFIX):].split(","):
        name, eq, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value) if eq else float("nan")
        except ValueError:
            weight = float("nan")
        if not name or not eq or not math.isfinite(weight):
            raise DataError(f"Cannot read the mixture part {item!r} of {spec!r}: each part is NAME=WEIGHT, e.g. "
                            f"mix:prose=0.4,chat=0.3,code=0.3.")
        if name == "general" or name.startswith(MIX_PREFIX):
            raise DataError(f"Mixtures do not nest: {spec!r} contains {name!r}; list its parts instead.")
        if name in weights:
            raise DataError(f"The mixture {spec!r} names {name!r} twice; give each part once.")
        weights[name] = weight
    return _normalise(weights, repr(spec))


def document_chars(doc: Document) -> int:
    """Size of a document for the interleaving: characters of its text or message contents, 4 per token id."""
    if doc.text is not None:
        return len(doc.text)
    if doc.messages is not None:
        return sum(len(m.get("content") or "") for m in doc.messages)
    return 4 * len(doc.input_ids or [])


def interleave(parts: Mapping[str, Callable[[], Iterator[Document]]], weights: Mapping[str, float]
               ) -> Iterator[Document]:
    """Documents of ``parts`` (name -> zero-argument iterator factory) interleaved by character share (rule in the
    module docstring); ends when the part whose turn it is has no document left."""
    names = list(parts)
    iters = {n: iter(parts[n]()) for n in names}
    emitted = {n: 0 for n in names}
    while True:
        name = min(names, key=lambda n: (emitted[n] / weights[n], names.index(n)))
        doc = next(iters[name], None)
        if doc is None:
            return
        emitted[name] += max(1, document_chars(doc))
        yield doc


def describe_mixture(weights: Mapping[str, float]) -> str:
    """``"prose 40%, chat 30%, code 30%"``."""
    return ", ".join(f"{n} {100 * w:.0f}%" for n, w in weights.items())


def mixture_source(weights: Mapping[str, float], open_fn: Callable[[str], DocumentSource], *,
                   spec: Optional[str] = None) -> DocumentSource:
    """A :class:`DocumentSource` mixing the sources ``open_fn(name)`` (:func:`.sources.open_source`) with
    ``weights`` (normalised) by character share. Each part is opened now, so a missing package or file fails here."""
    w = _normalise(dict(weights), "given")
    sources = {name: open_fn(name) for name in w}
    spec = spec or MIX_PREFIX + ",".join(f"{n}={v:g}" for n, v in w.items())
    desc = f"mixture of {describe_mixture(w)} by characters (" + "; ".join(s.description
                                                                          for s in sources.values()) + ")"
    return DocumentSource(spec, desc, lambda: interleave({n: s.__iter__ for n, s in sources.items()}, w))


def mixture_from_spec(spec: str, open_fn: Callable[[str], DocumentSource]) -> DocumentSource:
    """The source for ``general`` or a ``mix:`` spec, its parts opened by ``open_fn`` (the caller's
    :func:`.sources.open_source`: passed in so that this module does not import it back)."""
    return mixture_source(parse_mixture(spec), open_fn, spec=spec)


def weighted_shares(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """``total`` split into integer shares proportional to ``weights`` by the largest-remainder method:
    ``floor(total * w_i)`` each, then one more to the parts with the largest remainders (ties: the first listed)
    until the shares sum to ``total``. Every part with positive weight gets at least one when ``total`` allows."""
    w = _normalise(dict(weights), "given")
    names = list(w)
    if total < 0:
        raise ValueError(f"total must be >= 0 (got {total}).")
    exact = {n: total * w[n] for n in names}
    shares = {n: int(math.floor(exact[n])) for n in names}
    by_remainder = sorted(names, key=lambda n: (-(exact[n] - shares[n]), names.index(n)))
    for n in by_remainder[:total - sum(shares.values())]:
        shares[n] += 1
    if total >= len(names):
        for n in names:
            if shares[n] == 0:
                donor = max(names, key=lambda m: (shares[m], -names.index(m)))
                shares[donor] -= 1
                shares[n] += 1
    return shares
