"""Config dataclasses fail fast, naming the key and the valid choices."""

import pytest

from flowalign.config import Config, SamplingConfig, TrainConfig, config_from_dict, with_overrides


def test_defaults_are_valid_and_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"train": {"lrr": 1e-3}}, "unknown key train.lrr; valid keys: "),
        ({"trian": {}}, "unknown config section 'trian'"),
        ({"sampling": {"sampler": "euler"}}, "sampling.sampler='euler' is not valid; choose one of flow_sde"),
        ({"train": {"group_size": 1}}, "train.group_size must be >= 2"),
        ({"train": {"lr": 0}}, "train.lr must be > 0"),
        ({"grpo": {"kl_scaling": "approx"}}, "choose one of exact, reference"),
        ({"sampling": {"sde_window": [8, 5]}}, "sampling.sde_window=[8, 5]"),
        ({"model": {"dtype": "fp8"}}, "model.dtype='fp8' is not valid"),
        ({"model": {"autocast": "float32"}}, "model.autocast='float32' is not valid; choose one of bfloat16"),
        ({"train": {"eval_per_task": -1}}, "train.eval_per_task must be >= 0"),
        ({"opd": {"divergence": "kl"}}, "opd.divergence: unknown divergence 'kl'; choose one of reverse_kl"),
        ({"opd": {"divergence": "alpha"}}, "opd.divergence: divergence 'alpha' needs alpha=a"),
        ({"crd": {"old_decay_max": 1.0}}, "crd.old_decay_max is now crd.old_schedule ('0-0.25-0.005-<max>')"),
        ({"grpo": {"adv_std": "group"}}, "grpo.adv_std is now advantage.std: rename the key"),
        ({"crd": {"old_schedule": "0-0.25-fast"}}, "crd.old_schedule: schedule '0-0.25-fast' must be "),
        ({"nft": {"old_decay_max": 1.0}}, "nft.old_decay_max must be in [0, 1), got 1.0"),
        ({"train": {"lrr": 1e-3}}, "unknown key train.lrr; valid keys: lr, "),  # the close match first
        ({"train": {"lr": float("inf")}}, "train.lr must be a finite number > 0, got inf"),
        ({"train": {"grad_clip": -1}}, "train.grad_clip must be > 0, got -1.0"),
        ({"train": {"weight_decay": -0.1}}, "train.weight_decay must be >= 0, got -0.1"),
        ({"sampling": {"guidance_scale": float("nan")}}, "sampling.guidance_scale must be a finite number >= 0"),
        ({"model": {"lora_dropout": 1.5}}, "model.lora_dropout must be in [0, 1), got 1.5"),
        ({"model": {"lora_alpha": 0}}, "model.lora_alpha must be > 0, got 0.0"),
        ({"advantage": {"clip": float("inf")}}, "advantage.clip must be a finite number > 0, got inf"),
        ({"sampling": {"sde_window": [0.5, 2]}}, "sampling.sde_window=[0.5, 2] must be [start, length]: 2 integers"),
        ({"model": {"device": "gpu"}}, "model.device='gpu' is not a torch device"),
        ({"opd": {"teachers": {"a": {"lora": "x", "guidance_scale": float("nan")}}}},
         "opd.teachers.a.guidance_scale must be a finite number > 0, got nan"),
        ({"opd": {"extrapolation": 0}}, "opd.extrapolation must be a finite number > 0 (1 = plain OPD), got 0"),
    ],
)
def test_bad_values_name_the_key(data, needle):
    with pytest.raises(ValueError) as err:
        config_from_dict(data)
    assert needle in str(err.value)


def test_overrides_build_a_new_validated_config():
    cfg = Config()
    new = with_overrides(cfg, {"train.lr": 1e-3, "sampling.sde_window": [0, 3]})
    assert new.train.lr == 1e-3 and cfg.train.lr == TrainConfig().lr
    assert new.sampling.sde_window == (0, 3)
    with pytest.raises(ValueError, match="unknown key"):
        with_overrides(cfg, {"sampling.steps": 3})


def test_sde_window_inside_steps():
    assert SamplingConfig(num_steps=4, sde_window=[1, 3]).sde_window == (1, 3)


def test_divergence_help_lists_every_table_entry():
    import dataclasses

    from flowalign.algorithms.divergences import DIVERGENCES
    from flowalign.config import DistillConfig, GRPOConfig

    for cls, name in ((GRPOConfig, "kl_divergence"), (DistillConfig, "divergence")):
        text = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["help"]
        assert all(d in text for d in DIVERGENCES), (cls.__name__, text)


def test_sections_from_python_check_types_too():
    """The dataclasses called directly (not through config_from_dict) reject what YAML would: bools and floats for
    integers, strings for numbers, NaN; ints become floats for float fields."""
    import math

    for build, needle in [(lambda: TrainConfig(iterations=2.5), "train.iterations=2.5 must be an integer"),
                          (lambda: TrainConfig(iterations=True), "train.iterations=True must be an integer"),
                          (lambda: TrainConfig(lr="fast"), "train.lr='fast' must be a number"),
                          (lambda: TrainConfig(grad_clip=math.nan), "train.grad_clip must be a finite number > 0"),
                          (lambda: SamplingConfig(guidance_scale=-1), "sampling.guidance_scale must be >= 0"),
                          (lambda: Config(train="x"), "Config.train must be a TrainConfig")]:
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(")):
            build()
    assert TrainConfig(lr=1).lr == 1.0 and type(TrainConfig(lr=1).lr) is float
    assert SamplingConfig(guidance_scale=0).guidance_scale == 0.0  # 0..1: no CFG (diffusers applies it above 1)


def test_eval_reward_options_name_an_eval_reward_and_reach_the_held_out_rewards():
    from flowalign.config import load_config
    from flowalign.evaluation.heldout import HeldoutEval

    with pytest.raises(ValueError, match="train.eval_reward_options maps a name of train.eval_rewards"):
        config_from_dict({"train": {"eval_reward_options": {"clip_score": {"model": "tiny"}}}})
    with pytest.raises(ValueError, match="train.eval_reward_options"):
        config_from_dict({"train": {"eval_rewards": ["clip_score"], "eval_reward_options": {"clip_score": 3}}})
    cfg = load_config("configs/toy_demo.yaml")
    assert cfg.train.eval_reward_options == {"clip_score": {"model": "tiny"}}
    ev = HeldoutEval(["toy:colors"], per_task=1, steps=1, guidance_scale=1.0, extra=["clip_score"],
                     reward_options=cfg.train.eval_reward_options)
    assert ev._reward("clip_score").name == "clip_score"  # the tiny CLIP: offline, no hub download
