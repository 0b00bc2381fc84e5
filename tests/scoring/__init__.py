"""Tests of ner_merge.scoring: the kernel, the score cache, workers and Ray."""
