"""A work-around for a mergekit 0.1.5 bug that stops every BERT merge.

`MergePlanner.plan_tensor` checks whether any model stores an optional weight
with `[w_in.name] + (w_in.aliases or [])`, but `aliases` is a tuple, so an
optional weight that has aliases raises TypeError before anything is read.
BERT's `embeddings.position_ids` is one (mergekit's bert.json), so no BERT
recipe can be planned at all. The hook (see hook.py) wraps `plan_tensor` when
`mergekit.plan` executes: for NER recipes only, and only for such weights, it
does the presence check itself and hands mergekit the weight marked required,
which takes mergekit past the broken line; the models lacking it still load
nothing (their input weights stay optional), so the method gets the copies that
exist, as mergekit intends. Other recipes and weights pass through untouched.
"""

import functools
from types import ModuleType

from ner_merge.recipe.recipe import METHOD_NAME


def fix_optional_aliases(plan_module: ModuleType) -> None:
    """Wrap `plan_module.MergePlanner.plan_tensor` as the module docstring says."""
    from mergekit.io.tasks import LoaderCache

    planner = plan_module.MergePlanner
    original = planner.plan_tensor

    @functools.wraps(original)
    def plan_tensor(self, weight, weights_in, models, cfg_reader):
        if (
            self.config.merge_method == METHOD_NAME
            and weight.optional
            and any(w.aliases for w in weights_in)
        ):
            stored = any(
                name in LoaderCache().get(model).index.tensor_paths
                for model, w in zip(models, weights_in)
                for name in (w.name, *(w.aliases or ()))
            )
            if not stored:
                return  # mergekit skips an optional weight no model stores
            weight = weight.model_copy(update={"optional": False})
        return original(self, weight, weights_in, models, cfg_reader)

    planner.plan_tensor = plan_tensor
