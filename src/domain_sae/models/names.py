"""Model identity: when two model names denote the same model (the one rule used by SAE compatibility checks in
``sae`` and by the evaluation).

    normalise_model_name(s) = last path component of s, lower-cased, without a ``.gguf`` extension and without a
                              quantisation / precision suffix (``.Q4_1``, ``-q8_0``, ``_f16``, ``.bf16``, ...)

so ``HuggingFaceTB/SmolLM2-135M-Instruct`` == ``SmolLM2-135M-Instruct.Q4_1.gguf`` == ``smollm2-135m-instruct`` and
``openai-community/gpt2`` == ``gpt2``.
"""

from __future__ import annotations

import re
from typing import Optional


def normalise_model_name(name: str) -> str:
    s = str(name).strip().rstrip("/").replace("\\", "/").split("/")[-1].lower()
    s = re.sub(r"\.gguf$", "", s)
    s = re.sub(r"[.\-_](q\d[\w]*|f16|f32|bf16)$", "", s)
    return s


def same_model_name(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two model names denote the same model (see the module docstring); False when either is empty."""
    if not a or not b:
        return False
    return normalise_model_name(a) == normalise_model_name(b)
