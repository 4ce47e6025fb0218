import pytest

from toolchain.errors import RecipeError
from toolchain.recipe import parse_recipe, resolve_layers

GOOD = """
seed = 3
[[stage]]
pass = "prune"
only = "fc"
rounds = 2
[stage.layers.default]
quality = 1.0
[stage.layers.ip1]
density = 0.05
[stage.retrain]
epochs = 1
lr = 0.001
"""


def test_good_recipe_parses_and_resolves(lenet300_path):
    from converters import import_onnx

    r = parse_recipe(GOOD)
    st = r.stages[0]
    assert r.seed == 3 and st.options.rounds == 2 and st.retrain.lr == 0.001 and st.retrain.seed == 3
    layers = resolve_layers(st, import_onnx(lenet300_path))
    assert layers["ip1"].density == 0.05 and layers["ip1"].quality is None
    assert layers["ip2"].quality == 1.0 and set(layers) == {"ip1", "ip2", "ip3"}


@pytest.mark.parametrize("text,match", [
    (GOOD.replace("rounds = 2", "roundz = 2"), "unknown key 'roundz'"),
    (GOOD.replace('pass = "prune"', 'pass = "prnue"'), "unknown pass 'prnue'"),
    (GOOD.replace("density = 0.05", "density = 1.5"), r"density must be in \(0, 1\]"),
    (GOOD.replace("density = 0.05", "density = 0"), r"density must be in \(0, 1\]"),
    (GOOD.replace("lr = 0.001", "learning_rate = 0.001"), "retrain: unknown key 'learning_rate'"),
    (GOOD.replace('only = "fc"', 'only = "rnn"'), "only must be"),
    ("seed = 1\n", "at least one"),
    ("[[stage]\n", "not valid TOML"),
    (GOOD + "\nfoo = 1\n", "unknown key 'foo'"),
])
def test_bad_recipes_fail_before_training(text, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(text)


def test_unknown_layer_is_named(lenet300_path):
    from converters import import_onnx

    r = parse_recipe(GOOD.replace("[stage.layers.ip1]", "[stage.layers.fc9]"))
    with pytest.raises(RecipeError, match="layer 'fc9' is not in the model"):
        resolve_layers(r.stages[0], import_onnx(lenet300_path))


def test_load_toml_table_names_what_it_reads(tmp_path):
    from toolchain.recipe import load_toml_table

    good = tmp_path / "train.toml"
    good.write_text("epochs = 2\nlr = 0.01\n")
    assert load_toml_table(good) == {"epochs": 2, "lr": 0.01}
    with pytest.raises(RecipeError, match="^cannot read training config .*missing.toml"):
        load_toml_table(tmp_path / "missing.toml")
    with pytest.raises(RecipeError, match="^training config .* is a directory, not a file$"):
        load_toml_table(tmp_path)
    with pytest.raises(RecipeError, match="^cannot read schedule "):
        load_toml_table(tmp_path / "missing.toml", "schedule")
    (tmp_path / "bad.toml").write_text("epochs = \n")
    with pytest.raises(RecipeError, match="bad.toml: not valid TOML"):
        load_toml_table(tmp_path / "bad.toml")
