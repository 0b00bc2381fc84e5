"""Property tests: any malformed option set, recipe or source map is a clean error."""

import copy
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ner_merge.errors import RecipeError, SourceMapError
from ner_merge.options import NerOptions
from ner_merge.recipe import Recipe
from ner_merge.source_map import ModelEntry, SourceMap, TensorChoice

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
    else:
        assert set(options.model_dump()) == set(NerOptions.model_fields)


RECIPE_KEYS = ["merge_method", "base_model", "models", "dtype", "parameters", "slices"]


@FUZZ
@given(st.dictionaries(st.sampled_from(RECIPE_KEYS), json_values, max_size=5))
def test_any_recipe_document_validates_or_raises_recipe_error(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yml"
        path.write_text(yaml.safe_dump(document))
        try:
            Recipe.from_file(path)
        except RecipeError as error:
            assert str(path) in str(error)


def _valid_map() -> dict:
    models = tuple(
        ModelEntry(name=n, path=f"/m/{n}", revision=None, fingerprint="0" * 64, role=r)
        for n, r in (("base", "base"), ("tuned", "fine-tuned"))
    )
    tensors = {
        "w": TensorChoice(
            source="tuned",
            rule="highest-ner",
            layer=0,
            shape=(2, 2),
            scores={"base": 0.5, "tuned": 0.75},
        ),
        "b": TensorChoice(
            source="tuned", rule="follows", layer=0, shape=(2,), follows="w"
        ),
    }
    return SourceMap(models=models, options={}, tensors=tensors).model_dump(mode="json")


VALID_MAP = _valid_map()


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


def _load(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "map.json"
        path.write_bytes(text)
        try:
            SourceMap.load(path)
        except SourceMapError as error:
            assert str(path) in str(error)


@FUZZ
@given(mutated_maps())
def test_any_edited_map_loads_or_raises_source_map_error(document):
    _load(json.dumps(document).encode())


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_load_or_raise_source_map_error(data):
    _load(data)


def test_the_unmutated_map_round_trips():
    source_map = SourceMap.model_validate(VALID_MAP)
    assert json.loads(source_map.to_json()) == VALID_MAP
    assert SourceMap.model_validate_json(source_map.to_json()) == source_map
