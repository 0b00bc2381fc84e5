"""Did the merge help? Perplexity on held-out text, and recipes compared.

Modules: `perplexity` (model folders scored on text files, `ner-merge eval`),
`compare` (`ner-merge compare`: recipes and a plain average merged, every model
scored), `compare_figure` (its PNG) and `words` (counts said in words).
"""
