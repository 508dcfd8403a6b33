"""Runs: ``dsae train`` / ``finetune`` / ``resume`` of one SAE (:mod:`.single`), many SAEs from one model pass
(:mod:`.many`) and what a run directory holds and when it may be reused (:mod:`.directory`)."""
