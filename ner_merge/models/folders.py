"""Is a folder a usable model, with a real tokenizer? Checked before the slow work.

transformers, asked for a tokenizer from a folder without tokenizer files, does
not always fail: for Qwen2 it builds one with a single token, which mergekit
would then save beside a merge, and for others it fails with a message about
sentencepiece or tiktoken that says nothing of the missing files. These checks
say what is missing, in terms of the folder, before any tensor is scored or any
model loaded. transformers is imported only when a check runs.
"""

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ner_merge.errors import ModelError

if TYPE_CHECKING:
    from mergekit.options import MergeOptions

    from ner_merge.recipe.recipe import Recipe

# Longest library error message quoted in a problem (it goes on one line).
MAX_REASON = 200


def tokenizer_problem(
    folder: str | Path, trust_remote_code: bool = False
) -> str | None:
    """Why transformers would make no real tokenizer from `folder`; None if it would.

    The tokenizer class transformers picks for the folder declares the files it
    reads (`vocab_files_names`); a tokenizer loaded while none of them exists was
    made from nothing. When loading fails outright, a folder without the
    tokenizer config transformers starts from simply has no tokenizer, which says
    more than the library's message about converters and sentencepiece.
    """
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code
        )
    except Exception as error:  # OSError, ValueError, ImportError...: all say why
        if not (Path(folder) / TOKENIZER_CONFIG_FILE).is_file():
            return (
                f"it holds no tokenizer ({TOKENIZER_CONFIG_FILE} is missing, and "
                "transformers cannot build one from the rest)"
            )
        reason = " ".join(str(error).split())
        if len(reason) > MAX_REASON:
            reason = reason[:MAX_REASON] + "..."
        return f"transformers cannot load its tokenizer ({reason})"
    files = _unique(tokenizer.vocab_files_names.values())
    if files and not any((Path(folder) / name).is_file() for name in files):
        return (
            f"it holds no tokenizer (none of the files its "
            f"{type(tokenizer).__name__} reads: {', '.join(files)})"
        )
    return None


def check_base_tokenizer(
    recipe: "Recipe", base_folder: str | Path, options: "MergeOptions"
) -> None:
    """Refuse, before planning, a merge that would get a broken tokenizer.

    mergekit copies the base's tokenizer into the merge (`copy_tokenizer`, on by
    default) or builds one from the base's (a `tokenizer:` option). From a base
    folder without tokenizer files it silently writes a one-token tokenizer, or
    logs an error after the merge; this says so up front. base_folder: the base
    model as resolved on disk (a Hub model's snapshot folder).
    """
    config = recipe.config
    if not (options.copy_tokenizer or config.tokenizer or config.tokenizer_source):
        return
    problem = tokenizer_problem(base_folder, options.trust_remote_code)
    if problem is None:
        return
    raise ModelError(
        f"{recipe.where}: base_model {config.base_model}: no usable tokenizer in "
        f"{base_folder}: {problem}; the merge's tokenizer comes from the base, and "
        "mergekit would write a broken one. Add the base's tokenizer files there, "
        "or merge with --no-copy-tokenizer and supply a tokenizer yourself"
    )


def model_folder_problem(folder: str | Path) -> str | None:
    """Why `folder` holds no model transformers can load; None if it may.

    Looks for transformers' config file and for weights in either of its formats,
    whole, sharded (any shard names) or indexed.
    """
    from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

    path = Path(folder)
    if not (path / CONFIG_NAME).is_file():
        return f"no {CONFIG_NAME} in it, so it is not a model folder"
    suffixes = _unique(Path(name).suffix for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME))
    if not any(next(path.glob(f"*{suffix}"), None) for suffix in suffixes):
        return f"no weights in it (no {' or '.join('*' + s for s in suffixes)} file)"
    return None


def _unique(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))
