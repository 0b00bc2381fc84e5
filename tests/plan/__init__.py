"""Tests of ner_merge.plan: the selection rules and the plans they make."""
