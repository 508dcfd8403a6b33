"""Architecture name (cfg.json ``architecture``) -> SAE class.

Only ``standard`` (ReLU + L1) is implemented; the other SAELens architectures are recognised so that loading one
fails with a clear "not supported yet" message instead of silently computing the wrong function.
"""

from __future__ import annotations

from ..errors import UserError

#: architectures SAELens (or the SPEC) knows that this package cannot run yet.
KNOWN_UNSUPPORTED = ("topk", "batchtopk", "abstopk", "jumprelu", "gated", "matryoshka_batchtopk", "transcoder",
                     "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder", "temporal",
                     "matching_pursuit")


class UnsupportedArchitectureError(UserError):
    """The SAE uses an architecture this package does not implement (yet)."""


def _classes() -> dict[str, type]:
    from .standard import StandardSAE
    return {"standard": StandardSAE}


def supported_architectures() -> list[str]:
    return sorted(_classes())


def get_sae_class(architecture: str, *, where: str = "") -> type:
    """The class for ``architecture``; raises :class:`UnsupportedArchitectureError` naming what is supported."""
    name = str(architecture or "standard").lower()
    classes = _classes()
    if name in classes:
        return classes[name]
    src = f" ({where})" if where else ""
    if name in KNOWN_UNSUPPORTED:
        raise UnsupportedArchitectureError(
            f"SAE architecture {name!r}{src} is not supported yet: domain-sae currently runs only "
            f"{', '.join(supported_architectures())} (ReLU + L1) SAEs. Load it with SAELens instead, or train a "
            f"standard SAE.")
    raise UnsupportedArchitectureError(
        f"Unknown SAE architecture {name!r}{src}; supported: {', '.join(supported_architectures())}.")
