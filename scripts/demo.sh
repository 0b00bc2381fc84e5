#!/usr/bin/env bash
# The main job on the embedded default: build the demo trio (a tiny Qwen2 base and
# two fine-tunes, trained here on bundled texts), merge it with the stock
# `mergekit-yaml`, show what the merge did, then compare NER recipes with a plain
# average of the same models on held-out text: did the merge help?
#
#   bash scripts/demo.sh       a line per stage, then what each stage found
#   bash scripts/demo.sh -v    also every tool's progress bars and log lines
set -euo pipefail
cd "$(dirname "$0")/.."
quiet="--quiet" verbose=""  # mergekit's and ner-merge's switches, left unquoted
case "${1:-}" in
    "") ;;
    -v | --verbose) quiet="" verbose="-v" ;;
    *) echo "usage: bash scripts/demo.sh [-v]" >&2 && exit 2 ;;
esac
source scripts/setup.sh report
TEXTS=ner_merge/demo/texts

stage() { printf '\n== %s\n' "$*"; }

if [ ! -f demo/models/kitchen/model.safetensors ]; then
    stage "Training the demo trio: ner-merge demo demo/models"
    ner-merge $verbose demo demo/models
fi
stage "Merging with NER: mergekit-yaml configs/tiny-ner.yml demo/out/ner"
mergekit-yaml $quiet configs/tiny-ner.yml demo/out/ner
ner-merge show demo/out/ner
stage "A sample from the merge: ner-merge generate demo/out/ner 'The skipper'"
ner-merge $verbose generate demo/out/ner "The skipper"
stage "Did it help? Three NER recipes and a plain average: ner-merge compare"
ner-merge $verbose compare configs/tiny-ner.yml configs/tiny-ner-layer.yml \
    configs/tiny-nerd.yml --linear -o demo/compare \
    -t $TEXTS/heldout_general.txt -t $TEXTS/heldout_sea.txt \
    -t $TEXTS/heldout_kitchen.txt
