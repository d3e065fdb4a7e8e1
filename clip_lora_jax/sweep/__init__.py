"""Sweeps: a paper's whole evaluation (methods x datasets x shots x seeds, and the generalisation
protocols) as ordinary runs, resumable, collected into one store, and the paper's tables and
plots made from that store.

  python -m clip_lora_jax.sweep --methods lora,zero_shot --datasets all --shots 1,2,4,8,16 \\
      --seeds 1,2,3 --protocol fewshot --root runs/paper
  python -m clip_lora_jax.sweep.report --root runs/paper     # tables and plots again

`protocols` (the cells), `runner` (executors, resuming, retries, progress), `store` (the JSONL
store), `tables` and `plots`.
"""
