"""Living inside mergekit: the merge method, the merge around it, the output.

Modules: `method` (the registered merge method), `pipeline` (plan or check the
map, merge, publish, wrapped around mergekit's run_merge), `output` (the output
folder: refusals, lock, staging, publishing), `space` (the bytes a merge will
write, checked against the free disk before scoring), `mergekit_range` (the
mergekit versions ner-merge runs with), `interrupt` (Ctrl-C in one line, in the
right state), `mergekit_fixes` (a work-around for a mergekit 0.1.5 bug) and
`quiet` (what a quiet merge leaves out). The hook
that attaches them to a stock `mergekit-yaml` is `ner_merge.hook`.
"""
