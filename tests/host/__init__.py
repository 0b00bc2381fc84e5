"""Tests of ner_merge.host: the output folder, its disk space, every platform."""
