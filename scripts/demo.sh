#!/usr/bin/env bash
# The main job on the embedded default: build the demo trio (a tiny Qwen2 base and
# two fine-tunes, trained here on bundled texts), merge it with the stock
# `mergekit-yaml`, and show what the merge did.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

if [ ! -f demo/models/kitchen/model.safetensors ]; then
    ner-merge demo demo/models
fi
mergekit-yaml configs/tiny-ner.yml demo/out/ner
echo
sed -n '/^## Models/,/^## How/p' demo/out/ner/ner_report.md | sed '$d'
echo "Full report: demo/out/ner/ner_report.md; source map: demo/out/ner/ner_source_map.json"
echo
ner-merge generate demo/out/ner "The skipper"
