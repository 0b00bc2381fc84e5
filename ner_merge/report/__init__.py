"""What a merge tells its reader, drawn from its source map (no tensor read).

Modules: `markdown` (the report, the model card's section, the terminal plan
table), `figure` (the merge's PNG), `grid` (a map as layers by tensor type) and
`card` (the model card).
"""
