"""ner-merge: Normalized-Effective-Rank layer selection for mergekit."""

__version__ = "0.1.0"
