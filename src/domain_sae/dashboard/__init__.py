"""The feature dashboard: a FastAPI app over a feature store (:mod:`.app`), background ablation jobs
(:mod:`.jobs`), HTML page shells (:mod:`.pages`), the static export (:mod:`.export`) and the server entry point
(:mod:`.serve`). Front-end assets (vanilla JS/CSS, no network) live in ``assets/``."""
