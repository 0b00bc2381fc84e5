"""Tests of ner_merge.recipe: the recipe and its options."""
