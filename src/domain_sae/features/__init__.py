"""Feature store: per-latent statistics of one or more SAEs on held-out tokens, in one SQLite file.

- :mod:`.build`: :func:`build_feature_store` (what ``dsae features`` runs; the study can call it too).
- :mod:`.store`: :class:`FeatureStore`, read-only queries (feature list, one latent, comparisons).
- :mod:`.prompt`: per-token metrics of a prompt (activation, quantile, direct logit effect, ablation loss change).
- :mod:`.schema`: the versioned SQLite schema.
"""

from .schema import SCHEMA_VERSION, StoreError

__all__ = ["SCHEMA_VERSION", "FeatureStore", "StoreError", "build_feature_store"]


def __getattr__(name):  # lazy: importing the package stays cheap for the CLI
    if name == "build_feature_store":
        from .build import build_feature_store
        return build_feature_store
    if name == "FeatureStore":
        from .queries import FeatureStore
        return FeatureStore
    raise AttributeError(name)
