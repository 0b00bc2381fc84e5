"""Tests of ner_merge.models: finding and reading models, vocabularies."""
