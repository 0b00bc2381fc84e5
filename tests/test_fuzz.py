"""Property tests: any malformed option set, recipe or source map is a clean error."""

import copy
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ner_merge.errors import RecipeError, SourceMapError
from ner_merge.plan.source_map import SourceMap
from ner_merge.recipe.options import NerOptions
from ner_merge.recipe.recipe import Recipe
from tests.helpers import small_source_map

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8), inner, max_size=3),
    ),
    max_leaves=8,
)
option_names = st.one_of(
    st.sampled_from(list(NerOptions.model_fields)), st.text(max_size=10)
)


@FUZZ
@given(st.dictionaries(option_names, json_values, max_size=4))
def test_any_option_set_validates_or_raises_recipe_error(parameters):
    try:
        options = NerOptions.from_parameters(parameters, where="fuzz.yml")
    except RecipeError as error:
        assert "fuzz.yml" in str(error)
    else:  # loaded as given, every other option at its default
        assert options.model_dump() == {**DEFAULTS, **parameters}


# Valid values of each option, written out here rather than read from the models.
patterns = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._*?[]", min_size=1),
    min_size=1,
    max_size=3,
)
VALID_OPTIONS = {
    "source_map": st.none() | st.text(min_size=1, max_size=12),
    "granularity": st.sampled_from(["tensor", "module", "layer"]),
    "keep_base": st.none() | patterns.map(",".join),
    "compat": st.sampled_from([None, "nerd"]),
    "stabilize": st.booleans(),
    "scoring": st.sampled_from(["auto", "fast", "exact"]),
    "nonfinite": st.sampled_from(["error", "lose"]),
}
DEFAULTS = {
    "source_map": None,
    "granularity": "tensor",
    "keep_base": None,
    "compat": None,
    "stabilize": None,  # unset: on with compat nerd (NerOptions.stabilizes)
    "scoring": "auto",  # exact on a CPU, fast on a GPU (scoring.scoring_route)
    "nonfinite": "error",
}
valid_options = st.fixed_dictionaries({}, optional=VALID_OPTIONS).filter(
    lambda options: (
        options.get("compat") is None or options.get("scoring", "auto") == "auto"
    )
)  # NERD scores by a rule of its own


@FUZZ
@given(valid_options)
def test_any_valid_option_set_loads_to_the_values_given(parameters):
    options = NerOptions.from_parameters(parameters, where="fuzz.yml")
    assert options.model_dump() == {**DEFAULTS, **parameters}


RECIPE_KEYS = ["merge_method", "base_model", "models", "dtype", "parameters", "slices"]


@FUZZ
@given(st.dictionaries(st.sampled_from(RECIPE_KEYS), json_values, max_size=5))
def test_any_recipe_document_validates_or_raises_recipe_error(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yml"
        path.write_text(yaml.safe_dump(document))
        try:
            recipe = Recipe.from_file(path)
        except RecipeError as error:
            assert str(path) in str(error)
        else:
            assert document["merge_method"] == "ner"
            assert str(recipe.config.base_model) == str(document["base_model"])


model_names = st.builds(
    "{}{}".format,
    st.sampled_from(["/m/", "org/", ""]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=8),
)


@st.composite
def valid_recipes(draw):
    """A valid recipe document, and what it must load to: the candidates in
    order, the options and each candidate's excluded patterns."""
    names = draw(st.lists(model_names, min_size=2, max_size=4, unique=True))
    base, tuned = names[0], names[1:]
    excluded = [draw(st.none() | patterns) for _ in tuned]
    models = [
        {"model": name}
        if patterns_ is None
        else {"model": name, "parameters": {"exclude": ",".join(patterns_)}}
        for name, patterns_ in zip(tuned, excluded)
    ]
    if draw(st.booleans()):  # the base may be listed among the models too
        models.insert(draw(st.integers(0, len(models))), {"model": base})
    document = {"merge_method": "ner", "base_model": base, "models": models}
    # mergekit takes no null parameter: an option left out is the way to say None
    options = {k: v for k, v in draw(valid_options).items() if v is not None}
    if options or draw(st.booleans()):
        document["parameters"] = options
    dtype = draw(st.sampled_from([None, "bfloat16", "float16", "float32"]))
    if dtype is not None:
        document["dtype"] = dtype
    expected = {
        "candidates": names,
        "options": {**DEFAULTS, **options},
        "exclusions": [(), *(tuple(p or ()) for p in excluded)],
        "dtype": dtype,
    }
    return document, expected


@FUZZ
@given(valid_recipes())
def test_any_valid_recipe_loads_to_the_values_given(generated):
    document, expected = generated
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yml"
        path.write_text(yaml.safe_dump(document))
        recipe = Recipe.from_file(path)
    assert [str(model) for model in recipe.candidates()] == expected["candidates"]
    assert str(recipe.config.base_model) == expected["candidates"][0]
    assert recipe.options.model_dump() == expected["options"]
    assert [tuple(e) for e in recipe.exclusions] == expected["exclusions"]
    assert recipe.config.dtype == expected["dtype"]
    assert recipe.where == str(path)


VALID_MAP = small_source_map().model_dump(mode="json")


def _paths(value, prefix=()):
    """Every path into a JSON document, for mutations to aim at."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


MAP_PATHS = [p for p in _paths(VALID_MAP) if p]


@st.composite
def mutated_maps(draw):
    document = copy.deepcopy(VALID_MAP)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(MAP_PATHS))
        parent = document
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    return document


def _load(text: bytes) -> SourceMap | None:
    """The loaded map, or None after a SourceMapError that names the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "map.json"
        path.write_bytes(text)
        try:
            return SourceMap.load(path)
        except SourceMapError as error:
            assert str(path) in str(error)
            return None


@FUZZ
@given(mutated_maps())
def test_any_edited_map_loads_or_raises_source_map_error(document):
    source_map = _load(json.dumps(document).encode())
    if source_map is not None:  # what it says is what the document says
        assert [m.name for m in source_map.models] == [
            m["name"] for m in document["models"]
        ]
        assert {name: c.source for name, c in source_map.tensors.items()} == {
            name: c["source"] for name, c in document["tensors"].items()
        }


finite = st.floats(allow_nan=False, allow_infinity=False)
finite_json = st.recursive(  # standard JSON: no NaN or Infinity
    st.one_of(st.none(), st.booleans(), st.integers(), finite, st.text(max_size=12)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8), inner, max_size=3),
    ),
    max_leaves=8,
)
small_ints = st.integers(0, 10_000)


@st.composite
def valid_maps(draw) -> dict:
    """A valid source map document with every field written out."""
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, unique=True))
    base = draw(st.integers(0, len(names) - 1))
    models = [
        {
            "name": name,
            "path": draw(st.text(max_size=12)),
            "revision": draw(st.none() | st.text(max_size=12)),
            "fingerprint": draw(st.text(alphabet="0123456789abcdef", max_size=64)),
            "role": "base" if index == base else "fine-tuned",
            "exclude": draw(patterns | st.just([])),
        }
        for index, name in enumerate(names)
    ]
    model = st.sampled_from(names)
    follows = st.none() | st.fixed_dictionaries(
        {
            "kind": st.sampled_from(["tensor", "unit", "layer", "non-layer"]),
            "name": st.none() | st.text(max_size=16),
        }
    )
    rules = [
        "highest-ner",
        "highest-mean-ner",
        "follows",
        "base",
        "keep-base",
        "override",
    ]

    def choice() -> dict:
        scores = draw(st.dictionaries(model, st.none() | finite, max_size=len(names)))
        bound = st.floats(0, 1e-3)
        bounds = draw(st.dictionaries(st.sampled_from(names), bound))
        return {
            "source": draw(model),
            "rule": draw(st.sampled_from(rules)),
            "layer": draw(st.none() | small_ints),
            "shape": draw(st.lists(small_ints, max_size=3)),
            "scores": scores,
            "bounds": {n: b for n, b in bounds.items() if n in scores},
            "refined": draw(st.booleans()),
            "follows": draw(follows),
            "unit": draw(st.none() | st.text(max_size=16)),
            "excluded": draw(st.lists(model, max_size=2)),
            "stabilized": draw(st.none() | st.floats(0, 1)),
        }

    tensors = {
        draw(st.text(max_size=16)): choice() for _ in range(draw(st.integers(0, 4)))
    }
    route = st.none() | st.fixed_dictionaries(
        {
            "scoring": st.sampled_from(["fast", "exact", "nerd"]),
            "reason": st.text(max_size=24),
        }
    )
    return {
        "format_version": 4,
        "models": models,
        "options": draw(st.dictionaries(st.text(max_size=8), finite_json, max_size=3)),
        "route": draw(route),
        "tensors": tensors,
    }


@FUZZ
@given(valid_maps())
def test_any_valid_map_loads_to_the_values_given(document):
    source_map = _load(json.dumps(document).encode())
    assert source_map is not None
    assert source_map.model_dump(mode="json") == document


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_load_or_raise_source_map_error(data):
    _load(data)


def test_the_unmutated_map_round_trips():
    source_map = SourceMap.model_validate(VALID_MAP)
    assert json.loads(source_map.to_json()) == VALID_MAP
    assert SourceMap.model_validate_json(source_map.to_json()) == source_map
