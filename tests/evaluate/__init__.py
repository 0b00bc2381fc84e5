"""Tests of ner_merge.evaluate: perplexity and `ner-merge compare`."""
