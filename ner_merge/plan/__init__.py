"""The plan: which model each output tensor comes from, as a source map.

Modules: `selection` (the selection rules, their only home; no torch, no
mergekit), `source_map` (the map document), `planner` (`plan()`: inventory,
scoring and rules composed) and `stabilized` (the stabilize stage's shares).
"""
