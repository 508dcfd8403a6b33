"""Helpers that import nothing of the package but :mod:`domain_sae.errors`: atomic writes (:mod:`.atomic`), the JSON
sanitiser (:mod:`.jsonsafe`), Markdown escaping (:mod:`.markdown`), the one rule for output directories
(:mod:`.outdirs`) and Hugging Face plumbing (:mod:`.hf`)."""
