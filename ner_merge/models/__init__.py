"""The models a recipe names, up to the tensors mergekit will write; nothing
here scores.

Modules: `resolve` (each model found in a folder or the Hub cache, its headers
and config), `reader` and `torch_archive` (one tensor at a time from safetensors
or `.bin` shards), `content` (exact identity: tensor hashes, NaN/Inf flags, the
content index), `cache_folder` (where the caches live, atomic writes),
`inventory` (the recipe's models and every output tensor), `names` (tensor-name
structure), `vocabulary` (differing vocabularies), `folders` (is a folder a
model with a real tokenizer?) and `lora` (a `BASE+ADAPTER` fine-tune merged by
mergekit into a folder named by its content).
"""
