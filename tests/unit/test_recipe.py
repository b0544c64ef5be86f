from pathlib import Path

import pytest

from qtrain.recipe import Recipe, RecipeError, load_recipe, parse_override

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert r.effective_batch_size >= 1


def test_required_recipes_exist():
    names = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert {"cpu-lora.yaml", "cpu-full.yaml"} <= names


def test_unknown_key_is_named_with_suggestion(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: lora\nlora_rnak: 8\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'lora_rnak'.*did you mean 'lora_r'"):
        load_recipe(f)


@pytest.mark.parametrize("override,match", [
    ("lora_r=eight", "'lora_r' must be int"),
    ("method=prefix", "'method' must be one of"),
    ("seq_len=0", "'seq_len' must be > 0"),
    ("gradient_checkpointing=maybe", "'gradient_checkpointing' must be bool"),
    ("val_fraction=1.5", "'val_fraction'"),
    ("target_modules=everything", "'target_modules' is 'everything'"),
    ("nonsense", "not of the form key=value"),
    ("learning_rate=.nan", "'learning_rate' must be a positive number"),
    ("learning_rate=.inf", "'learning_rate' must be a positive number"),
    ("weight_decay=.nan", "'weight_decay' must be a finite number"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(None, [override])


def test_overrides_are_typed():
    r = load_recipe(ROOT / "recipes" / "cpu-lora.yaml",
                    ["lora_r=8", "learning_rate=1e-4", "target_modules=[q_proj, v_proj]", "gradient_checkpointing=true"])
    assert r.lora_r == 8 and r.learning_rate == pytest.approx(1e-4)
    assert r.target_modules == ["q_proj", "v_proj"] and r.gradient_checkpointing is True
    assert parse_override("min_lr_ratio=0")[1] == 0


def test_int_is_accepted_for_float_and_normalised():
    assert isinstance(Recipe(learning_rate=1).learning_rate, float)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("no/such/recipe.yaml")


def test_recipe_must_be_a_mapping(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(f)
