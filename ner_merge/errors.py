"""The errors ner-merge raises for bad input; each message names what is wrong."""


class NerMergeError(Exception):
    """Base class: a problem with the user's recipe, models or source map."""


class RecipeError(NerMergeError, ValueError):
    """The recipe (YAML file or its NER options) is malformed or invalid."""


class ModelError(NerMergeError):
    """A model cannot be found, read, or does not match the others."""


class SourceMapError(NerMergeError, ValueError):
    """A source map is malformed, or was made for other models or tensors."""


class EvaluationError(NerMergeError):
    """A model or text given to `ner-merge eval` cannot be loaded or scored."""


class OutputError(NerMergeError):
    """The output folder cannot be written, or must not be replaced."""


class CompareError(NerMergeError):
    """Recipes given to `ner-merge compare` cannot be compared with each other."""


def torch_failure(error: Exception) -> str:
    """What went wrong in torch, in one line: its exception's kind and first
    line (torch raises many kinds, some with pages of text, for a bad device)."""
    reason = next(iter(str(error).strip().splitlines()), "")
    return f"{type(error).__name__}: {reason}"


class DiskFullError(OutputError):
    """The disk filled up while a merge was written: nothing was published."""
