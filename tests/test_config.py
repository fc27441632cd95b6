"""Recipes and overrides: YAML + dotted key=value, type checks, durations, and errors that name the
full dotted key (or the file and line)."""

from pathlib import Path

import pytest

from orchard.config import Duration, build, describe, load_config, parse_override, to_dict
from orchard.errors import OrchardError
from orchard.methods.pretrain import PretrainConfig


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_recipe_or_overrides():
    config = load_config(PretrainConfig)
    assert config == PretrainConfig()
    assert config.train.max_steps == 1000
    assert config.data.path is None


def test_recipe_then_overrides(tmp_path):
    recipe = write(tmp_path / "r.yaml", "out: runs/x\ntrain:\n  max_steps: 50\n  lr: 3.0e-4\n"
                                        "model:\n  hidden_size: 64\n  num_hidden_layers: 2\n")
    config = load_config(PretrainConfig, recipe, [
        "train.max_steps=5", "model.num_hidden_layers=3", "data.path=[a.txt,b.txt]", "train.max_time=5m"])
    assert config.out == "runs/x"
    assert config.train.max_steps == 5              # the override beats the recipe
    assert config.train.lr == pytest.approx(3e-4)   # the recipe beats the default
    assert config.model.hidden_size == 64
    assert config.model.num_hidden_layers == 3
    assert config.model.num_attention_heads == 4    # untouched default
    assert config.data.path == ["a.txt", "b.txt"]
    assert isinstance(config.train.max_time, Duration)
    assert config.train.max_time == 300.0
    assert load_config(PretrainConfig, None, ["data.path=corpus.txt"]).data.path == "corpus.txt"


def test_a_default_step_limit_never_cuts_short_a_limit_the_recipe_sets(tmp_path):
    """pretrain's default max_steps (1000) stands only for a run given no limit: a recipe that sets
    max_time or max_tokens trains to it alone, and max_steps set too still counts."""
    timed = write(tmp_path / "t.yaml", "train:\n  max_time: 5m\n  lr: 2.0e-3\n")
    config = load_config(PretrainConfig, timed)
    assert config.train.max_steps is None and config.train.max_time == 300.0 and config.train.lr == 2e-3
    assert load_config(PretrainConfig, timed, ["train.max_steps=50"]).train.max_steps == 50
    assert load_config(PretrainConfig, None, ["train.max_tokens=4096"]).train.max_steps is None
    assert load_config(PretrainConfig, None, ["train.lr=1e-3"]).train.max_steps == 1000
    assert load_config(PretrainConfig, Path(__file__).parents[1] / "recipes" / "shakespeare.yaml").train.max_steps is None


@pytest.mark.parametrize("text,seconds", [("1h30m", 5400.0), ("5m", 300.0), ("90s", 90.0), ("300", 300.0),
                                          ("2h", 7200.0), ("1.5m", 90.0), ("1m30s", 90.0)])
def test_durations(text, seconds):
    assert load_config(PretrainConfig, None, [f"train.max_time={text}"]).train.max_time == seconds


@pytest.mark.parametrize("text", ["5x", "abc", "0", "-5m", "m5"])
def test_bad_durations(text):
    with pytest.raises(OrchardError, match=r"train\.max_time"):
        load_config(PretrainConfig, None, [f"train.max_time={text}"])


@pytest.mark.parametrize("override,key", [
    ("foo=1", "foo"),
    ("train.max_step=3", "train.max_step"),
    ("model.hidden=3", "model.hidden"),
    ("data.nested.deep=1", "data.nested"),
])
def test_unknown_keys_name_the_full_dotted_key(override, key):
    with pytest.raises(OrchardError) as error:
        load_config(PretrainConfig, None, [override])
    assert str(error.value).startswith(f"{key}: unknown key")


def test_unknown_key_suggests_close_names():
    with pytest.raises(OrchardError, match="did you mean max_steps"):
        load_config(PretrainConfig, None, ["train.max_step=3"])


def test_unknown_key_in_recipe(tmp_path):
    recipe = write(tmp_path / "r.yaml", "train:\n  max_steps: 5\n  warmup: 3\n")
    with pytest.raises(OrchardError, match=r"^train\.warmup: unknown key"):
        load_config(PretrainConfig, recipe)


@pytest.mark.parametrize("override,key", [
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=2.5", "train.max_steps"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.lr=-1", "train.lr"),
    ("train.precision=fp8", "train.precision"),
    ("train.compile=maybe", "train.compile"),
    ("model.num_key_value_heads=3", "model.num_key_value_heads"),
    ("model.hidden_size=[1]", "model.hidden_size"),
    ("data.path={a: 1}", "data.path"),
    ("data.path=[a.txt,{b: 1}]", "data.path"),
    ("train=5", "train"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(OrchardError) as error:
        load_config(PretrainConfig, None, [override])
    assert key in str(error.value)


def test_conversions_where_unambiguous():
    config = load_config(PretrainConfig, None, ["model.rope_theta=1000000", "model.vocab_size=1e3",
                                                "train.precision=bf16", "init=null"])
    assert config.model.rope_theta == 1e6 and isinstance(config.model.rope_theta, float)
    assert config.model.vocab_size == 1000 and isinstance(config.model.vocab_size, int)
    assert config.train.precision == "bf16"
    assert config.init is None
    with pytest.raises(OrchardError, match="out"):
        load_config(PretrainConfig, None, ["out=null"])


@pytest.mark.parametrize("text", ["train.max_steps", "=5", "train..max_steps=5"])
def test_malformed_overrides(text):
    with pytest.raises(OrchardError, match="key=value"):
        parse_override(text)


def test_invalid_yaml_names_file_and_line(tmp_path):
    recipe = write(tmp_path / "bad.yaml", "out: a\ntrain:\n  max_steps: 5\n   lr: 3\n")
    with pytest.raises(OrchardError) as error:
        load_config(PretrainConfig, recipe)
    assert str(error.value).startswith(f"{recipe}:4: invalid YAML")


def test_recipe_that_is_not_a_mapping(tmp_path):
    recipe = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(OrchardError, match="mapping"):
        load_config(PretrainConfig, recipe)
    empty = write(tmp_path / "empty.yaml", "")
    assert load_config(PretrainConfig, empty) == PretrainConfig()


def test_missing_recipe_names_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(OrchardError) as error:
        load_config(PretrainConfig, missing)
    assert str(missing) in str(error.value)
    assert "no such recipe" in str(error.value)


def test_describe_lists_keys_defaults_and_docs():
    rows = {key: (default, doc) for key, default, doc in describe(PretrainConfig)}
    assert rows["train.max_steps"] == ("1000", "Stop after this many optimizer steps.")  # the recipe's default
    assert rows["train.max_time"][1].startswith("Stop after this much training time")
    assert rows["model.num_key_value_heads"][0] == "4"
    assert rows["out"][0] == "'runs/pretrain'"
    assert "model" not in rows and "train" not in rows  # nested configs are expanded, not listed
    assert "data.path" in rows and "tokenizer.vocab_size" in rows


def test_to_dict_round_trips_through_build():
    config = load_config(PretrainConfig, None, ["train.max_time=1h30m", "data.path=[a.txt,b.txt]",
                                                "model.num_key_value_heads=2", "train.precision=fp32"])
    data = to_dict(config)
    assert data["train"]["max_time"] == 5400.0 and type(data["train"]["max_time"]) is float
    assert data["model"]["num_key_value_heads"] == 2
    rebuilt = build(PretrainConfig, data)
    assert rebuilt == config
    assert isinstance(rebuilt.train.max_time, Duration)
    assert to_dict(rebuilt) == data


def test_method_configs_share_the_base_fields_and_read_in_order():
    """A method config inherits init, out, peft and train; its help and recipe list its own values
    first, then its sections, then the inherited sections; a redeclared default is the method's own."""
    from orchard.methods.dpo import DPOConfig
    from orchard.training.launch import MethodConfig

    config = load_config(DPOConfig, None, ["init=runs/sft", "peft.method=lora", "beta=0.2"])
    assert isinstance(config, MethodConfig)
    assert (config.init, config.out, config.peft.method, config.beta) == ("runs/sft", "runs/dpo", "lora", 0.2)
    assert (config.train.max_steps, config.train.lr) == (200, 5e-5)  # the pair methods' defaults, not the base's
    assert list(to_dict(config))[:3] == ["init", "out", "loss"]
    assert list(to_dict(config))[-3:] == ["data", "peft", "train"]
    keys = [key for key, _, _ in describe(DPOConfig)]
    assert keys.index("beta") < keys.index("data.path") < keys.index("peft.method") < keys.index("train.lr")
    docs = {key: doc for key, _, doc in describe(DPOConfig)}
    assert docs["out"] == "Run directory. Running again resumes it."
