"""LoRA fine-tunes, named as mergekit names them: `model: BASE+ADAPTER`.

mergekit reads such a model from a folder it makes first: `ModelReference.merged`
loads the base, applies the PEFT adapter with peft's `merge_and_unload`, and
saves the result under `--lora-merge-cache`. So that the planner scores exactly
the tensors the merge takes, the adapter is merged here by that same mergekit
call, and the merge is then given the merged folder as the model
(`inventory.localized_config`), with the same `--lora-merge-cache` (a folder
under ner-merge's cache when the user gives none, so the stock `mergekit-yaml`
command needs no option).

mergekit names its merged folder after the base's and adapter's paths and reuses
it by that name alone: an adapter retrained in place would be served the old
merge. The folder made here is named by content instead: a hash of the
adapter's files, the identity of the base's files (`content.file_key`, which
changes whenever a file may have), the merge dtype and peft's version. A changed
adapter or base gets a new folder, so no stale merged model, score or source map
is ever used for it; an unchanged pair reuses its folder. The same holds in a
folder the user gives. mergekit merges into a hidden temporary folder that is
renamed into place only when complete, so a killed merge leaves nothing that
could pass for a finished one.

Refused before any merging: an adapter folder that is missing or holds no PEFT
adapter, and an adapter whose factors do not fit the base's tensors.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import blake3
from mergekit.common import ModelPath, ModelReference
from mergekit.options import MergeOptions

from ner_merge.errors import ModelError
from ner_merge.models.cache_folder import CACHE_DIR_VARIABLE, default_cache_dir
from ner_merge.models.content import file_key
from ner_merge.models.reader import TensorHeader
from ner_merge.models.resolve import (
    Adapter,
    ResolvedModel,
    find_folder,
    read_headers,
    resolve_model,
)

ADAPTER_CONFIG = "adapter_config.json"
# The weights file peft reads, in its order of preference.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LORA_CACHE_FOLDER = "lora-merge"  # under ner-merge's cache folder
# peft's names: a module's factors (A, B), under this prefix of the module path.
LORA_FACTORS = {
    "lora_A.weight": "lora_B.weight",
    "lora_embedding_A": "lora_embedding_B",
}
PEFT_PREFIX = "base_model.model."
# Files of a model folder that hold its weights (the rest: config, tokenizer).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
MAX_REASON = 300  # longest library message quoted in a one-line error
HASH_CHUNK = 1 << 24


def resolve_lora_model(
    reference: ModelReference, options: MergeOptions
) -> ResolvedModel:
    """A `BASE+ADAPTER` model: checked, merged by mergekit (or found merged
    already, by content), and described as the folder of the merge."""
    name = str(reference)
    base = resolve_model(
        ModelReference(
            model=reference.model,
            override_architecture=reference.override_architecture,
        )
    )
    adapter = find_adapter(reference)
    check_fits(name, base, adapter)
    target = lora_merge_cache(options, name) / (
        f"{_label(reference.model)}_{_label(reference.lora)}_"
        f"{_merge_key(reference, base, adapter, options)[:16]}"
    )
    if not target.is_dir():
        _merge(name, reference, base, adapter, options, target)
    return ResolvedModel(
        name=name, path=str(target), revision=None, base=base, adapter=adapter
    )


def find_adapter(reference: ModelReference) -> Adapter:
    """The adapter's folder (local, or a Hub snapshot of peft's files), refused
    unless it holds a PEFT adapter; its content hash covers the files peft reads."""
    what = f"model {reference}: adapter {reference.lora}"
    path, revision = find_folder(
        what, reference.lora, [ADAPTER_CONFIG, *ADAPTER_WEIGHTS]
    )
    config = Path(path) / ADAPTER_CONFIG
    if not config.is_file():
        raise ModelError(f"{what}: {path} is not a PEFT adapter (no {ADAPTER_CONFIG})")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{what}: cannot read {config} ({error})") from None
    if not isinstance(settings, dict) or "peft_type" not in settings:
        raise ModelError(f"{what}: {config} is not a PEFT adapter's (no peft_type)")
    weights = adapter_weights(path)
    if weights is None:
        raise ModelError(
            f"{what}: {path} is not a PEFT adapter (no {' or '.join(ADAPTER_WEIGHTS)})"
        )
    return Adapter(
        name=str(reference.lora),
        path=path,
        revision=revision,
        hash=files_hash([config, weights]),
    )


def adapter_weights(folder: str) -> Path | None:
    """The adapter weights file peft would read from `folder`, if any."""
    found = (Path(folder) / name for name in ADAPTER_WEIGHTS)
    return next((path for path in found if path.is_file()), None)


def files_hash(paths: list[Path]) -> str:
    """BLAKE3 over each file's name, size and bytes, in the order given."""
    hasher = blake3.blake3()
    for path in paths:
        hasher.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as file:
            while chunk := file.read(HASH_CHUNK):
                hasher.update(chunk)
    return hasher.hexdigest()


def check_fits(name: str, base: ResolvedModel, adapter: Adapter) -> None:
    """Refuse an adapter whose factors B x A do not make the shape of the base
    tensor they change, one line per tensor, before anything is merged."""
    weights = adapter_weights(adapter.path)
    problems = misfits(read_headers(str(weights)), base.headers)
    if problems:
        raise ModelError(
            "\n".join(
                f"model {name}: adapter {adapter.path} does not fit base "
                f"{base.path}: {problem}"
                for problem in problems
            )
        )


def misfits(
    adapter: dict[str, TensorHeader], base: dict[str, TensorHeader]
) -> list[str]:
    """What does not fit, per base tensor a LoRA module changes.

    B x A makes (B rows, A columns): the base weight's shape for a Linear or a
    convolution's first two axes, and its transpose for an Embedding or a
    Conv1D (`fan_in_fan_out`). Modules not found in the base's files (stored
    under other names) are left to peft, whose error the merge then reports.
    """
    problems = []
    for a_name, a in sorted(adapter.items()):
        for a_suffix, b_suffix in LORA_FACTORS.items():
            if not a_name.endswith("." + a_suffix):
                continue
            module = a_name[: -len(a_suffix) - 1]
            b_name = f"{module}.{b_suffix}"
            b = adapter.get(b_name)
            target = module.removeprefix(PEFT_PREFIX) + ".weight"
            stored = base.get(target)
            if b is None or stored is None or min(len(a.shape), len(b.shape)) < 2:
                continue
            made = (b.shape[0], a.shape[1])
            if made == stored.shape[:2] or made[::-1] == stored.shape:
                continue
            problems.append(
                f"tensor {target} is {list(stored.shape)} in the base, but the "
                f"adapter's {b_name} {list(b.shape)} x {a_name} {list(a.shape)} "
                f"make {list(made)}"
            )
    return problems


def lora_merge_cache(options: MergeOptions, name: str) -> Path:
    """Where LoRA fine-tunes are merged: the user's `--lora-merge-cache`, else a
    folder in ner-merge's cache."""
    if options.lora_merge_cache:
        return Path(options.lora_merge_cache).absolute()
    root = default_cache_dir()
    if root is None:
        raise ModelError(
            f"model {name}: a LoRA adapter is merged into a folder before it is "
            f"scored, and the cache folder is off or unusable (${CACHE_DIR_VARIABLE})"
            ": give one with --lora-merge-cache"
        )
    return root / LORA_CACHE_FOLDER


def _label(model: ModelPath) -> str:
    """A readable name for a model or adapter in a folder's name: its last path
    component, without the characters mergekit's model syntax gives a meaning
    (`+` and `@`: the merged folder is itself handed to mergekit as a model)."""
    name = Path(model.path).name or "model"
    return name.replace("+", "_").replace("@", "_")


def _merge_key(
    reference: ModelReference,
    base: ResolvedModel,
    adapter: Adapter,
    options: MergeOptions,
) -> str:
    """Everything the merged bytes depend on: a new key, a new folder."""
    import peft  # its merge_and_unload computes the merged tensors

    files = sorted(path for path in Path(base.path).iterdir() if path.is_file())
    identity = {
        "adapter": adapter.hash,
        "base": {path.name: file_key(str(path)) for path in files},
        "dtype": options.lora_merge_dtype,
        "architecture": reference.override_architecture,
        "peft": peft.__version__,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _merge(
    name: str,
    reference: ModelReference,
    base: ResolvedModel,
    adapter: Adapter,
    options: MergeOptions,
    target: Path,
) -> None:
    """mergekit's own LoRA merge of the resolved base and adapter, published as
    `target` once complete (a concurrent run may publish the same merge first)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(
                dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
            )
        )
    except OSError as error:
        raise ModelError(
            f"model {name}: cannot merge its adapter into {target.parent} "
            f"({error.strerror or error}); give a writable --lora-merge-cache"
        ) from None
    try:
        local = ModelReference(
            model=ModelPath(path=base.path),
            lora=ModelPath(path=adapter.path),
            override_architecture=reference.override_architecture,
        )
        try:
            merged = local.merged(
                cache_dir=str(staging),
                trust_remote_code=options.trust_remote_code,
                lora_merge_dtype=options.lora_merge_dtype,
            )
        except Exception as error:  # transformers, peft, torch raise many kinds
            reason = " ".join(str(error).split())[:MAX_REASON]
            raise ModelError(
                f"model {name}: mergekit could not merge adapter {adapter.path} "
                f"into {base.path} ({type(error).__name__}: {reason})"
            ) from None
        folder = Path(merged.model.path)
        _copy_base_files(base.path, folder)
        try:
            os.rename(folder, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_base_files(base: str, merged: Path) -> None:
    """The base's files other than weights that mergekit's merge lacks (its
    tokenizer, above all): mergekit saves only the model, and a merged folder
    with a tokenizer serves as a recipe's base or as a model `compare` runs."""
    for path in sorted(Path(base).iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            if not (merged / path.name).exists():
                shutil.copyfile(path, merged / path.name)
