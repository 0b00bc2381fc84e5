#!/usr/bin/env bash
# The main job on the embedded default: build the demo trio (a tiny Qwen2 base and
# two fine-tunes, trained here on bundled texts), merge it with the stock
# `mergekit-yaml`, once with NER and once as a plain average for comparison, and
# show what the merge did and whether it helped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

if [ ! -f demo/models/kitchen/model.safetensors ]; then
    ner-merge demo demo/models
fi
mergekit-yaml configs/tiny-ner.yml demo/out/ner
mergekit-yaml configs/tiny-linear.yml demo/out/linear
echo
sed -n '/^## Models/,/^## How/p' demo/out/ner/ner_report.md | sed '$d'
echo "Full report: demo/out/ner/ner_report.md; figure: demo/out/ner/ner_report.png"
echo
ner-merge show demo/out/ner/ner_source_map.json
echo
ner-merge generate demo/out/ner "The skipper"
echo
ner-merge eval demo/models/base demo/models/sea demo/models/kitchen \
    demo/out/ner demo/out/linear
