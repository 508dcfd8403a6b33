"""Which token positions each evaluation quantity counts, from the segment codes of :mod:`domain_sae.data.segments`.

- Next-token positions (:func:`lm_positions`): position t predicts token t+1 and counts iff segments[t] != PAD and
  segments[t+1] not in {PAD, SPECIAL}; it belongs to the segment of its TARGET token.
- Reconstruction positions (:func:`reconstruction_positions`): segments[t] not in {PAD, SPECIAL}; each in the
  segment of its own token.
- Headline ("overall") = the counted positions whose segment is content: ``CONTENT_SEGMENTS`` = text, user,
  assistant, system. Chat-template text (role names, a template's default system prompt) is easy to predict and
  reconstruct and would flatter chat numbers; it is reported in the per-segment table, and ``all_tokens`` gives
  every counted position (content + template) when the two differ.
- Splice positions (:func:`splice_positions`): where the SAE's reconstruction (and the ablations) replace the hook's
  activation. Default: the SAE's training mask ``data.segments.training_mask(segments, exclude_special)`` (the
  positions it was trained on); ``all_positions=True``: every position (SAELens's convention).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.segments import ASSISTANT, PAD, SPECIAL, SYSTEM, TEXT, USER, segment_name, training_mask

__all__ = ["CONTENT_SEGMENTS", "OVERALL", "ALL_TOKENS", "lm_positions", "reconstruction_positions",
           "splice_positions", "groups", "has_template", "is_content", "token_counts", "segment_name"]

CONTENT_SEGMENTS = (TEXT, USER, ASSISTANT, SYSTEM)
OVERALL = "overall"
ALL_TOKENS = "all_tokens"


def lm_positions(segments: Tensor) -> Tensor:
    """Boolean [N, T-1]: position t counts for next-token metrics (see the module docstring)."""
    src, tgt = segments[:, :-1], segments[:, 1:]
    return (src != PAD) & (tgt != PAD) & (tgt != SPECIAL)


def reconstruction_positions(segments: Tensor) -> Tensor:
    """Boolean [N, T]: positions whose activation counts in the reconstruction metrics (not PAD, not SPECIAL)."""
    return (segments != PAD) & (segments != SPECIAL)


def is_content(segments: Tensor) -> Tensor:
    """Boolean, same shape: the segment is one of ``CONTENT_SEGMENTS``."""
    return torch.isin(segments.to(torch.int64), torch.tensor(CONTENT_SEGMENTS, dtype=torch.int64))


def splice_positions(segments: Tensor, exclude_special: bool, all_positions: bool = False) -> Tensor:
    """Boolean [N, T]: where the SAE's reconstruction replaces the activation (module docstring)."""
    if all_positions:
        return torch.ones(segments.shape, dtype=torch.bool)
    return training_mask(segments, exclude_special)


def has_template(segments: Tensor) -> bool:
    """Whether any counted position is not content (e.g. chat-template text): then ``all_tokens`` differs from
    ``overall`` and is reported as its own group."""
    rec = reconstruction_positions(segments)
    return bool((rec & ~is_content(segments)).any())


def groups(seg_codes: Tensor, base: Tensor, per_segment: bool, with_all: bool = False) -> dict[str, Tensor]:
    """{"overall": base & content, "all_tokens": base (with ``with_all``), segment name: base & (code == c) for the
    codes present (with ``per_segment``)}."""
    out = {OVERALL: base & is_content(seg_codes)}
    if with_all:
        out[ALL_TOKENS] = base
    if per_segment:
        for c in sorted(int(c) for c in torch.unique(seg_codes[base])):
            out[segment_name(c)] = base & (seg_codes == c)
    return out


def token_counts(segments: Tensor) -> dict[str, int]:
    """How many positions exist, are padding/special, and are counted by each family of metrics (all counted
    positions, and the headline content positions)."""
    lm = lm_positions(segments)
    rec = reconstruction_positions(segments)
    valid_pair = (segments[:, :-1] != PAD) & (segments[:, 1:] != PAD)
    return {
        "tokens/sequences": int(segments.shape[0]),
        "tokens/total": int(segments.numel()),
        "tokens/pad": int((segments == PAD).sum()),
        "tokens/special": int((segments == SPECIAL).sum()),
        "tokens/reconstruction_counted": int(rec.sum()),
        "tokens/reconstruction_counted_content": int((rec & is_content(segments)).sum()),
        "tokens/lm_counted": int(lm.sum()),
        "tokens/lm_counted_content": int((lm & is_content(segments[:, 1:])).sum()),
        "tokens/lm_excluded_special_target": int((valid_pair & (segments[:, 1:] == SPECIAL)).sum()),
    }
