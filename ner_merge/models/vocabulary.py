"""Models whose vocabularies differ: score what mergekit will hand the method.

With a tokenizer option in the recipe (`tokenizer: {source: base}`, `{source:
union}`, a model, or the older `tokenizer_source:`), mergekit builds the output
tokenizer and re-indexes every token-indexed tensor (embeddings, lm_head) of every
model to it before the merge method sees them. The planner has to score and
choose among those aligned copies, not the files' own, or its choices and the
method's inputs would disagree. So it runs mergekit's own tasks
(`BuildTokenizer`, `PermutedVocabulary`) on the tensors it reads: the alignment
is mergekit's, never re-implemented here.

Without a tokenizer option, differing vocabulary sizes are an error that names
the option (see `inventory.output_tensors`).
"""

from functools import cached_property

import torch
from mergekit.architecture.base import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import GatherTensors
from mergekit.options import MergeOptions
from mergekit.tokenizer import BuildTokenizer, PermutedVocabulary
from mergekit.tokenizer.build import TokenizerInfo

FIX_HINT = (
    "the vocabularies differ (added tokens?); set mergekit's tokenizer option in "
    "the recipe, e.g. `tokenizer: {source: base}` to keep the base's vocabulary "
    "or `tokenizer: {source: union}` to keep every model's tokens"
)


class VocabularyAlignment:
    """mergekit's tokenizer alignment for one (localized) recipe configuration."""

    def __init__(self, config: MergeConfiguration, merge_options: MergeOptions):
        tokenizer = config.tokenizer
        self._tokens = (tokenizer.tokens if tokenizer else None) or {}
        self._pad_to = tokenizer.pad_to_multiple_of if tokenizer else None
        self._base = config.base_model
        # Exactly the task mergekit's MergePlanner builds for this configuration.
        self._task = BuildTokenizer(
            base_model=config.base_model,
            referenced_models=tuple(config.referenced_models()),
            tokenizer_source=tokenizer.source if tokenizer else config.tokenizer_source,
            trust_remote_code=merge_options.trust_remote_code,
            add_tokens=tuple(self._tokens),
        )

    @cached_property
    def info(self) -> TokenizerInfo:
        return self._task.execute()

    @cached_property
    def size(self) -> int:
        """Length of the vocabulary axis of every aligned tensor.

        The output vocabulary, rounded up to `pad_to_multiple_of` as
        PermutedVocabulary pads it.
        """
        size = len(self.info.tokenizer.get_vocab())
        if self._pad_to:
            size = -(-size // self._pad_to) * self._pad_to
        return size

    def align(
        self,
        name: str,
        vocabulary_axis: int,
        tensors: dict[ModelReference, torch.Tensor],
    ) -> dict[ModelReference, torch.Tensor]:
        """Every model's copy of one token-indexed tensor, re-indexed by mergekit."""
        info = WeightInfo(name=name, vocabulary_axis=vocabulary_axis)
        task = PermutedVocabulary(
            gather_tensors=GatherTensors(
                weight_info=ImmutableMap(data={model: info for model in tensors})
            ),
            tokenizer_task=self._task,
            tokens=ImmutableMap(data=dict(self._tokens)),
            pad_to_multiple_of=self._pad_to,
            base_model=self._base,
            vocabulary_axis=vocabulary_axis,
        )
        return task.execute(tokenizer_info=self.info, tensors=tensors)


def vocabulary_alignment(
    config: MergeConfiguration, merge_options: MergeOptions
) -> VocabularyAlignment | None:
    """The alignment mergekit will apply, or None when the recipe asks for none."""
    if config.tokenizer is None and config.tokenizer_source is None:
        return None
    return VocabularyAlignment(config, merge_options)
