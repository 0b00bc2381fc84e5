"""What the disk-space check costs before a merge, on models of many shards.

Builds three 7B-shaped Qwen2 models (Qwen2.5-7B's shapes, bfloat16) whose
tensors are spread over many safetensors shards. The shards are sparse files:
their headers are real, their data holes, so the models take no disk space and
any read of tensor data would still be caught: reading tensors is made to fail
outright here, so a run that finishes proves the check reads none.

Prints the time to read every shard's header (done once per merge anyway, to
plan) and the time the check adds on top: the merge's size from the headers
(`ner_merge.host.space.merge_bytes`) and one free-space call.

    python benchmarks/bench_disk_check.py [--shards 200] [--repeats 5]
"""

import argparse
import json
import math
import statistics
import struct
import tempfile
import time
from pathlib import Path

from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from ner_merge.errors import OutputError
from ner_merge.host.space import check_room, merge_bytes
from ner_merge.models import content, reader
from ner_merge.models.resolve import ResolvedModel

HIDDEN, INTERMEDIATE, LAYERS, VOCABULARY, KV = 3584, 18944, 28, 152064, 512


def qwen2_7b_shapes() -> dict[str, list[int]]:
    shapes = {"model.embed_tokens.weight": [VOCABULARY, HIDDEN]}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": [HIDDEN, HIDDEN],
            prefix + "self_attn.q_proj.bias": [HIDDEN],
            prefix + "self_attn.k_proj.weight": [KV, HIDDEN],
            prefix + "self_attn.k_proj.bias": [KV],
            prefix + "self_attn.v_proj.weight": [KV, HIDDEN],
            prefix + "self_attn.v_proj.bias": [KV],
            prefix + "self_attn.o_proj.weight": [HIDDEN, HIDDEN],
            prefix + "mlp.gate_proj.weight": [INTERMEDIATE, HIDDEN],
            prefix + "mlp.up_proj.weight": [INTERMEDIATE, HIDDEN],
            prefix + "mlp.down_proj.weight": [HIDDEN, INTERMEDIATE],
            prefix + "input_layernorm.weight": [HIDDEN],
            prefix + "post_attention_layernorm.weight": [HIDDEN],
        }
    shapes |= {"model.norm.weight": [HIDDEN], "lm_head.weight": [VOCABULARY, HIDDEN]}
    return shapes


def write_sparse_model(folder: Path, shards: int) -> int:
    """A model folder whose shards hold real headers over holes; its size."""
    folder.mkdir(parents=True)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": VOCABULARY,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    names = list(qwen2_7b_shapes().items())
    weight_map, total = {}, 0
    for index in range(shards):
        file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name, shape in names[index::shards]:
            size = 2 * math.prod(shape)  # bfloat16
            header[name] = {
                "dtype": "BF16",
                "shape": shape,
                "data_offsets": [offset, offset + size],
            }
            offset += size
            weight_map[name] = file_name
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(folder / file_name, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)) + encoded)
            file.truncate(8 + len(encoded) + offset)  # a hole: no disk used
        total += offset
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_file))
    return total


def no_tensor_reads(*_args, **_kwargs):
    raise AssertionError("the disk check read tensor data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args()
    reader.read_bytes = content.read_bytes = no_tensor_reads
    with tempfile.TemporaryDirectory() as root:
        folders = [Path(root) / name for name in ("base", "one", "two")]
        size = [write_sparse_model(f, arguments.shards) for f in folders][0]
        config = MergeConfiguration(
            merge_method="ner",
            base_model=str(folders[0]),
            models=[{"model": str(f)} for f in folders[1:]],
            dtype="bfloat16",
        )
        start = time.perf_counter()
        models = [ResolvedModel(str(f), str(f), None) for f in folders]
        for model in models:
            model.headers  # noqa: B018 - read once per merge anyway, to plan
            model.config  # noqa: B018
        headers = time.perf_counter() - start
        times, needed = [], 0
        for _ in range(arguments.repeats):
            start = time.perf_counter()
            needed = merge_bytes(config, models, MergeOptions())
            try:
                check_room(Path(root) / "out", needed, "OUT")
            except OutputError:
                pass  # this machine's disk is smaller: the call was timed all the same
            times.append(time.perf_counter() - start)
    shards = arguments.shards
    print(
        f"3 models x {shards} shards, {len(qwen2_7b_shapes())} tensors each "
        f"({size / 1e9:.1f} GB of bfloat16 data each; sparse, none read)"
    )
    print(f"reading every header (cold, 3 x {shards} files): {headers:.3f} s")
    print(
        f"disk check (merge size {needed / 1e9:.2f} GB + free space), median "
        f"of {arguments.repeats}: {statistics.median(times) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
