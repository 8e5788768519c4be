"""GRPOConfig validation names the field and the fix; presets and YAML round-trip."""

import pytest

from grpo_lib.config import PRESETS, ConfigError, GRPOConfig


@pytest.mark.parametrize("field,value,message", [
    ("num_generations", 1, "num_generations=1 is invalid: GRPO compares completions inside a group"),
    ("loss_type", "ppo", "loss_type='ppo' is invalid: choose one of"),
    ("scale_rewards", "median", "scale_rewards='median' is invalid"),
    ("epsilon", -0.1, "epsilon=-0.1 is invalid: must be in"),
    ("beta", -1.0, "beta=-1.0 is invalid"),
    ("learning_rate", 0.0, "learning_rate=0.0 is invalid"),
    ("temperature", 0.0, "temperature=0.0 is invalid"),
    ("top_p", 1.5, "top_p=1.5 is invalid"),
    ("max_completion_length", 0, "max_completion_length=0 is invalid"),
    ("gradient_accumulation_steps", 3, "must divide prompts_per_step \\* num_generations = 32"),
    ("num_generations", "8", "num_generations='8' has type str; expected int"),
    ("load_in_4bit", "yes", "load_in_4bit='yes' has type str; expected bool"),
    ("max_steps", True, "max_steps=True is a bool; expected int"),
    ("reward_weights", (1.0,), "reward_weights=\\(1.0,\\) is invalid: needs one weight per reward function"),
    ("long_prompts", "truncate", "long_prompts='truncate' is invalid"),
    ("reward_timeout_s", 0, "reward_timeout_s=0 is invalid"),
    ("lora_r", 0, "lora_r=0 is invalid: 4-bit weights cannot be trained"),  # the default loads in 4 bit
    ("dtype", "fp8", "dtype='fp8' is invalid: choose one of"),
    ("epsilon_high", "0.28", "epsilon_high='0.28' has type str; expected float or None"),
])
def test_invalid_fields(field, value, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig(**{field: value})


def test_presets_are_valid_and_differ():
    tiny, t4 = GRPOConfig.preset("cpu-tiny"), GRPOConfig.preset("colab-t4")
    assert tiny.model == "smollm2-135m" and not tiny.load_in_4bit
    assert t4.load_in_4bit and t4.num_generations == 8 and t4.max_completion_length >= 256
    assert set(PRESETS) == {"cpu-tiny", "colab-t4", "cpu-code", "colab-t4-code"}
    with pytest.raises(ConfigError, match="unknown preset"):
        GRPOConfig.preset("tpu-huge")


def test_yaml_round_trip(tmp_path):
    c = GRPOConfig.preset("cpu-tiny", beta=0.0, epsilon_high=0.28, reward_weights=(1.0, 2.0))
    path = tmp_path / "c.yaml"
    c.to_yaml(str(path))
    assert GRPOConfig.from_yaml(str(path)) == c


def test_yaml_with_preset_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: cpu-tiny\nbeta: 0.1\n")
    c = GRPOConfig.from_yaml(str(path))
    assert c.beta == 0.1 and c.model == "smollm2-135m"
    path.write_text("preset: cpu-tiny\nbetta: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['betta'\]"):
        GRPOConfig.from_yaml(str(path))
    path.write_text("num_generations: 1\n")
    with pytest.raises(ConfigError, match="c.yaml: num_generations=1"):
        GRPOConfig.from_yaml(str(path))


def test_batch_size_and_epsilon_upper():
    c = GRPOConfig(prompts_per_step=3, num_generations=4, epsilon=0.2, epsilon_high=0.28)
    assert c.batch_size == 12 and c.epsilon_upper == 0.28


def test_type_checks_come_from_the_annotations():
    """One source of truth: every field's accepted classes are read off the dataclass annotations, so a
    new field is checked without a second table."""
    import dataclasses

    from grpo_lib.config import field_types

    types = field_types()
    assert set(types) == {f.name for f in dataclasses.fields(GRPOConfig)}
    assert types["lora_r"] == (int,) and types["system_prompt"] == (str, type(None))
    assert types["reward_funcs"] == (tuple,) and types["epsilon_high"] == (float, type(None))


def test_constants_are_defined_once():
    from grpo_lib import advantages, config, loss

    assert loss.LOSS_TYPES is config.LOSS_TYPES and advantages.SCALES is config.SCALE_REWARDS
