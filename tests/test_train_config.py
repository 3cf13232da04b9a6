"""Typed config: YAML and --set overrides, with errors that name the key."""

from pathlib import Path

import pytest

from engine.training.config import ConfigError, TrainConfig, config_from_dict, load_config, parse_overrides

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"c_thougt": 2})
    assert "c_thougt" in str(e.value) and "c_thought" in str(e.value)


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match="'num_epochs' expects int"):
        config_from_dict({"num_epochs": "three"})
    with pytest.raises(ConfigError, match="'cot' expects bool"):
        config_from_dict({"cot": 1})


def test_yaml_scientific_floats_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nsynthetic:\n  hops: 2\n  n_train: 10\n")
    cfg = load_config(path, ["lr=3e-4", "synthetic.hops=4", "cot=true", "name=x"])
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)
    assert cfg.synthetic == {"hops": 4, "n_train": 10}
    assert cfg.cot and not cfg.coconut and cfg.name == "x"


def test_overrides_need_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


@pytest.mark.parametrize(
    "values,needle",
    [
        ({"cot": True, "no_cot": True}, "exclusive"),
        ({"c_thought": 0}, "c_thought must be >= 1"),
        ({"uniform_prob": 1.5}, "uniform_prob"),
        ({"uniform_prob_from_stage": -1}, "uniform_prob_from_stage must be >= 0"),
        ({"zero_stage": 4}, "zero_stage"),
        ({"resume": 9, "num_epochs": 3}, "resume"),
        ({"only_eval": True}, "load_model_path"),
        ({"overlong": "truncate"}, "overlong"),
        ({"latent_passes": "graphs"}, "latent_passes must be"),
        ({"latent_passes": "cuda_graph", "zero_stage": 3, "zero3_leaf_language_model": False}, "zero3_leaf_language_model=true"),
        ({"latent_passes": "static", "zero_stage": 3, "zero3_leaf_language_model": False}, "zero3_leaf_language_model"),
        ({"latent_prefix_bucket": 0}, "latent_prefix_bucket must be >= 1"),
        ({"layer_ops": "triton"}, "layer_ops must be auto, fused or reference, got 'triton'"),
        ({"latent_block_ops": "fused"}, "key 'latent_block_ops' was renamed 'layer_ops'"),
        ({"eval_kv_cache": "static"}, "eval_kv_cache must be"),
        ({"eval_kv_cache": "paged", "zero_stage": 3}, "eval_kv_cache=paged needs zero_stage <= 2"),
        ({"lr": float("nan")}, "lr must be a finite number, got nan"),
        ({"lr": float("inf")}, "lr must be a finite number, got inf"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm must be a finite number"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
        ({"num_workers": -2}, "num_workers must be >= 0, got -2"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\]"),
        ({"synthetic": {"hop": 2}}, r"synthetic: unknown key\(s\) \['hop'\]; valid keys: n_train, n_val, seed, hops"),
        ({"synthetic": {"hops": 0}}, "synthetic: hops must be >= 1"),
        ({"synthetic": {"hops": "3"}}, "synthetic: hops must be an integer"),
        ({"allow_config_changes": ["c_thougt"]}, r"allow_config_changes names unknown key\(s\) \['c_thougt'\]"),
        ({"wandb": {"projekt": "x"}}, r"wandb: unknown key\(s\) \['projekt'\]; valid keys: project"),
        ({"wandb": {"mode": "cloud"}}, "wandb.mode must be one of online, offline, disabled"),
    ],
)
def test_invalid_values(values, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(values)


def test_missing_or_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.name


def test_resume_accepts_bool_or_epoch():
    assert config_from_dict({"resume": True}).resume is True
    assert config_from_dict({"resume": 3, "num_epochs": 6}).resume == 3


def test_nan_and_inf_from_yaml_and_overrides(tmp_path):
    for raw in (".nan", ".inf", "-.inf"):
        with pytest.raises(ConfigError, match="lr must be"):
            load_config(None, [f"lr={raw}"])
