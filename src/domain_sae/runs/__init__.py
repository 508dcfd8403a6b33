"""Runs: ``dsae train`` / ``finetune`` / ``resume`` of one SAE (:mod:`.single`), the parts a run is made of
(:mod:`.parts`), the end-to-end KL objective (:mod:`.kl_objective`), many SAEs from one model pass (:mod:`.many`)
and what a run directory holds and when it may be reused (:mod:`.directory`)."""
