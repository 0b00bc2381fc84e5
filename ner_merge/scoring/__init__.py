"""Scoring tensors: every copy the rules need, streamed, with the same bits on
any machine; it knows tensors and scores, not selection rules or maps.

Modules: `ner` (the NER kernel, exact and fast), `nerd` (the reference tool's
score and its stabilize stage), `streamed` (the scoring modes, streamed scoring,
NaN/Inf checks), `workers` and `cluster` (where scores run: threads, or Ray),
`threads` (passive OpenMP waits) and `cache` (the on-disk score cache).
"""
