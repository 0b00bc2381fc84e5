"""Tests of ner_merge.report: what a merge shows its reader."""
