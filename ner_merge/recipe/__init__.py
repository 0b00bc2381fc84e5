"""The recipe: a mergekit YAML with `merge_method: ner` and its NER options,
checked whole, every problem named by file and field, before any model is read.

Modules: `recipe` (the document, its models, the method's name) and `options`
(the frozen NER options model and its validation messages).
"""
