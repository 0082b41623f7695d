"""Recipes: mergekit configs parse unchanged; everything else fails early with the key named."""

from __future__ import annotations

import pytest

from flows.recipe import RecipeError, load_recipe, parse_recipe

MERGEKIT_TIES = """
models:
  - model: s3://zoo/base
    # no parameters necessary for base model
  - model: s3://zoo/experts/math
    parameters:
      density: 0.5
      weight: 0.5
  - model: s3://zoo/experts/code
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: s3://zoo/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_mergekit_ties_config_parses_unchanged():
    r = parse_recipe(MERGEKIT_TIES, source="ties.yaml", output="s3://out/m")
    assert r.method == "ties" and r.base == "s3://zoo/base"
    assert r.inputs == ["s3://zoo/experts/math", "s3://zoo/experts/code"]  # the base is not an expert
    assert r.weights == (0.5, 0.3)
    assert r.parameters["density"] == [0.5, 0.5] and r.parameters["lambda"] == 1.0
    assert r.out_dtype == "float16" and r.output == "s3://out/m" and r.name == "ties"


def test_top_level_parameters_are_defaults_for_models():
    r = parse_recipe(
        "merge_method: dare_ties\nbase_model: b\nparameters: {density: 0.3, weight: 2}\n"
        "models: [{model: x}, {model: y, parameters: {density: 0.7}}]\n"
    )
    assert r.parameters["density"] == [0.3, 0.7] and r.weights == (2.0, 2.0)


def test_linear_needs_no_base_and_out_dtype_wins_over_dtype():
    r = parse_recipe("merge_method: linear\nmodels: [a, b]\ndtype: float32\nout_dtype: bfloat16\n")
    assert r.base is None and r.out_dtype == "bfloat16" and r.parameters == {"normalize": True}
    assert parse_recipe("merge_method: linear\nmodels: [a]\ndtype: bf16\n").out_dtype == "bfloat16"


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: ties\nbase_model: b\nmodels: [x]\nslices: []\n", "'slices' is a mergekit feature mergeline does not support"),
        ("merge_method: ties\nbase_model: b\nmodels: [x]\ntokenizer_source: union\n", "'tokenizer_source'"),
        ("merge_method: linear\nmodels: [x, y]\ntokenizer_source: base\n", "'tokenizer_source'"),  # no base to take it from
        ("merge_method: ties\nbase_model: b\nmodels: [x]\nfoo: 1\n", "unknown key 'foo'"),
        ("merge_method: slerp\nmodels: [x]\n", "unknown merge method 'slerp'"),
        ("merge_method: ties\nmodels: [x]\n", "'ties' needs 'base_model'"),
        ("merge_method: ties\nbase_model: b\nmodels: []\n", "no experts"),
        ("merge_method: ties\nbase_model: b\nmodels: [x]\nparameters: {density: 1.5}\n", r"density must be in \(0, 1\]"),
        ("merge_method: ties\nbase_model: b\nmodels: [x]\nparameters: {densty: 0.5}\n", "unknown parameter 'densty'"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: x, parameters: {lambda: 2}}]\n", "per-model parameter 'lambda'"),
        ("merge_method: ties\nbase_model: b\nmodels: [x]\nparameters: {density: [{filter: mlp, value: 0.5}]}\n", "filters"),
        ("merge_method: ties\nbase_model: b\nmodels: [x]\ndtype: int8\n", "dtype 'int8' not supported"),
        ("merge_method: ties\nbase_model: b\nmodels: [x]\ndevice: tpu\n", "device 'tpu'"),
        ("merge_method: ties\nbase_model: b\nmodels: [x+lora]\n", "lora"),
        ("merge_method: linear\nmodels: [x]\nparameters: {normalize: 'false'}\n", "'normalize' .* must be true or false"),
        ("merge_method: ties\nbase_model: b\nmodels: [x]\nparameters: {lambda: null}\n", "'lambda' .* finite number, got None"),
        ("merge_method: ties\nbase_model: b\nmodels: [x]\nparameters: {lambda: big}\n", "'lambda' .* finite number, got 'big'"),
        ("merge_method: ties\nbase_model: b\nmodels: [x]\nparameters: {density: true}\n", "'density' .* finite number, got True"),
        ("merge_method: linear\nmodels: [{model: x, parameters: {weight: .nan}}]\n", "weight of expert 0 must be a finite number"),
        ("merge_method: linear\nmodels: [x, {model: y, parameters: {weight: null}}]\n", "weight of expert 1 .* got None"),
        ("merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}, {model: y, parameters: {weight: -1}}]\n",
         "sum to zero; linear with normalize: true"),
        ("merge_method: dare_linear\nbase_model: b\nparameters: {normalize: true}\n"
         "models: [{model: x, parameters: {weight: 2}}, {model: y, parameters: {weight: -2}}]\n", "sum to zero"),
        ("merge_method: linear\nmerge_method: ties\nmodels: [x]\n", "key 'merge_method' is given twice"),
        ("merge_method: linear\nmodels: [{model: x, parameters: {weight: 0.1}}, {model: y, parameters: {weight: 0.2}},"
         " {model: z, parameters: {weight: -0.3}}]\n", "sum to zero"),  # 5.5e-17 in floats
        ("- just a list\n", "YAML mapping"),
        ("merge_method: [\n", "not valid YAML"),
    ],
)
def test_invalid_recipes_name_the_problem(text, message):
    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe(text, source="bad.yaml")
    assert str(info.value).startswith("bad.yaml: ")


def test_tokenizer_source_base_is_what_mergeline_does_anyway():
    r = parse_recipe("merge_method: ties\nbase_model: b\nmodels: [x, y]\ntokenizer_source: base\n")
    assert (r.method, r.base, r.inputs) == ("ties", "b", ["x", "y"])


def test_load_recipe_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_linear_averages_a_listed_base_while_methods_with_a_base_drop_it():
    """mergekit's linear has no base: a model listed under models is averaged even if it is also
    base_model. Task-vector methods skip it (its task vector is zero), however its URI is spelled."""
    r = parse_recipe("merge_method: linear\nbase_model: /m/a\nmodels: [/m/a, /m/b]\n")
    assert r.inputs == ["/m/a", "/m/b"]
    r = parse_recipe("merge_method: ties\nbase_model: /m/base/\nmodels: [/m/base, /m/x]\n")
    assert r.inputs == ["/m/x"]


def test_mergekit_options_of_every_task_arithmetic_method_are_accepted():
    r = parse_recipe("merge_method: task_arithmetic\nbase_model: b\nmodels: [x]\nparameters: {int8_mask: true}\n")
    assert r.parameters["int8_mask"] is True
    r = parse_recipe("merge_method: dare_linear\nbase_model: b\nmodels: [x]\nparameters: {normalize: true}\n")
    assert r.parameters["normalize"] is True


def test_yaml_merge_keys_still_work_with_the_duplicate_key_check():
    r = parse_recipe("merge_method: ties\nbase_model: b\nmodels:\n"
                     "  - {model: x, parameters: &p {weight: 1, density: 0.5}}\n"
                     "  - {model: y, parameters: {<<: *p, weight: 0.5}}\n")
    assert r.weights == (1.0, 0.5) and r.parameters["density"] == [0.5, 0.5]
