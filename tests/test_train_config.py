"""Typed config: YAML and --set overrides, with errors that name the key."""

from pathlib import Path

import pytest

from engine.training.config import ConfigError, TrainConfig, config_from_dict, load_config, parse_overrides

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"c_thougt": 2})
    assert "c_thougt" in str(e.value) and "c_thought" in str(e.value)


def test_the_original_coconuts_config_files_load_as_they_are(tmp_path, caplog):
    """Its files (args/*.yaml) carry keys with no meaning here (project, local, local_path, special_token, debug)
    and spell "no model to load" as the string None: they were refused as unknown keys."""
    original = tmp_path / "prosqa_coconut.yaml"
    original.write_text(
        "project: coconut\nsave_path: runs\nname: prosqa-coconut\nlocal: True\nlocal_path: /models/gpt2\n"
        "only_eval: False\ncoconut: True\nspecial_token: False\ncot: False\nno_thoughts: False\nno_cot: False\n"
        "c_thought: 1\nepochs_per_stage: 5\nmax_latent_stage: 6\npad_latent_to_max: True\nsave_only_improve: False\n"
        "uniform_prob: 0.0\nmodel_id: tiny\nload_model_path: None\nseed: 0\nresume: 0\nbf16: False\n"
        "reset_optimizer: True\nbatch_size_training: 32\ndebug: False\ngradient_accumulation_steps: 1\n"
        "num_epochs: 50\nlr: !!float \"1e-4\"\nweight_decay: 0.01\n"
    )
    with caplog.at_level("WARNING"):
        config = load_config(original)
    assert config.load_model_path is None and config.epochs_per_stage == 5 and config.lr == 1e-4
    assert "'project', 'local', 'local_path', 'special_token', 'debug'" in caplog.text
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"projekt": "x"})  # other unknown keys stay errors


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
        ({"name": "../../elsewhere"}, "name must be one folder name"),
        ({"name": ".."}, "name must be one folder name"),
        ({"name": ""}, "name must be one folder name"),
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


def test_a_key_given_twice_is_an_error(tmp_path):
    """PyYAML would keep the second value without a word."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("lr: 1.0e-3\nnum_epochs: 2\nlr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"(?s)key 'lr' is given twice \(first at line 1\).*line 3"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("synthetic:\n  hops: 2\n  hops: 3\n")
    with pytest.raises(ConfigError, match="key 'hops' is given twice"):
        load_config(nested)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text"):
        load_config(path)


@pytest.mark.parametrize(
    "pairs, needle",
    [
        (["lr=[1"], r"--set 'lr=\[1': the value is not valid YAML"),
        (["num_epochs=1", "num_epochs.x=2"], r"num_epochs was set to 1 by an earlier --set"),
        (["synthetic=null", "synthetic.hops=3"], r"synthetic was set to None by an earlier --set"),
    ],
)
def test_overrides_that_cannot_be_read_are_named(pairs, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_overrides(pairs)


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


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"gradient_accumulation_steps": 2}, "deepspeed.gradient_accumulation_steps is set by the trainer from "
                                             "gradient_accumulation_steps"),
        ({"train_micro_batch_size_per_gpu": 8}, "set by the trainer from batch_size_training"),
        ({"scheduler": {"type": "WarmupLR"}}, "set by the trainer from lr_schedule"),
        ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage is set by the trainer from zero_stage"),
        ({"zero_optimization": 3}, "zero_optimization must be a mapping"),
        ({"zero_optimization": {"contiguous_gradientz": True}}, "did you mean 'contiguous_gradients'"),
        ({"zero_optimizaton": {"overlap_comm": False}}, "unknown key 'zero_optimizaton'; did you mean 'zero_optimization'"),
    ],
)
def test_deepspeed_overrides_that_would_be_ignored_or_fight_the_trainer_are_named(overrides, needle):
    pytest.importorskip("deepspeed")
    with pytest.raises(ConfigError, match=needle):
        config_from_dict({"deepspeed": overrides})


@pytest.mark.parametrize("overrides, needle", [
    ({"bf16": True}, "deepspeed.bf16 must be a mapping"),
    ({"zero_optimization": None}, "deepspeed.zero_optimization must be a mapping"),
    ({"activation_checkpointing": {"partition_activations": True}}, "set activation_checkpointing: true"),
    ({"steps_per_print": "abc"}, "steps_per_print must be an integer"),
    ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "apply to ZeRO-3 only"),
    ({"zero_optimization": {"stage3_prefetch_bucket_size": 10}}, "apply to ZeRO-3 only"),
])
def test_deepspeed_overrides_that_would_do_nothing_or_fail_late_are_named(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict({"deepspeed": overrides, "zero_stage": 2})


def test_the_whole_deepspeed_config_is_read_as_deepspeed_reads_it():
    """Wrong values inside a section were found by deepspeed.initialize, as a traceback from the engine's build."""
    pytest.importorskip("deepspeed")
    from engine.training.optim import check_deepspeed_config, deepspeed_config

    for overrides, needle in (
        ({"zero_optimization": {"overlap_comm": "maybe"}}, "overlap_comm"),
        ({"zero_optimization": {"offload_optimizer": {"devic": "cpu"}}}, "devic"),
        ({"communication_data_type": "int7"}, "communication_data_type"),
        ({"bf16": {"enabled": True}}, "runs on cpu train in fp32"),
    ):
        with pytest.raises(ConfigError, match=needle):
            check_deepspeed_config(config_from_dict({"deepspeed": overrides}), False, "cpu", 1)
    config = config_from_dict({"deepspeed": {"csv_monitor": {"enabled": True}}, "name": "r", "save_path": "/runs"})
    check_deepspeed_config(config, False, "cpu", 1)
    # DeepSpeed's monitors wrote into ./DeepSpeedJobName of the working folder
    assert deepspeed_config(config, False, 1)["csv_monitor"] == {"enabled": True, "output_path": "/runs/r/deepspeed/",
                                                                 "job_name": "r"}
    # merged at every depth: a nested override kept its siblings only one level down
    nested = config_from_dict({"deepspeed": {"timers": {"throughput": {"synchronized": True}}}})
    assert deepspeed_config(nested, False, 1)["timers"] == {"throughput": {"enabled": True, "synchronized": True}}


def test_offloaded_optimizer_states_take_deepspeeds_cpu_adam():
    """DeepSpeed refuses torch's AdamW over offloaded states and names an optimizer the trainer refused."""
    from engine.training.optim import offloads_optimizer, resolve_optimizer

    offload = config_from_dict({"deepspeed": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}})
    assert offloads_optimizer(offload) and not offloads_optimizer(config_from_dict({}))
    assert resolve_optimizer("auto", "cuda", offloads_optimizer(offload)) == "deepspeed_cpu_adam"
    assert resolve_optimizer("auto", "cuda") == "adamw_fused"
    with pytest.raises(ConfigError, match="offloading needs ZeRO"):  # DeepSpeed ignores it at stage 0
        config_from_dict({"zero_stage": 0, "deepspeed": offload.deepspeed})
    pytest.importorskip("deepspeed")
    from engine.training.optim import check_deepspeed_config

    torch_adam = config_from_dict({"optimizer": "adamw", "deepspeed": offload.deepspeed})
    with pytest.raises(ConfigError, match="DeepSpeed takes only its CPU Adam over offloaded optimizer states"):
        check_deepspeed_config(torch_adam, False, "cpu", 1)  # it failed inside deepspeed.initialize
    forced_off = {**offload.deepspeed, "zero_force_ds_cpu_optimizer": False}
    check_deepspeed_config(config_from_dict({"optimizer": "adamw", "deepspeed": forced_off}), False, "cpu", 1)


def test_deepspeed_overrides_the_trainer_leaves_open_pass():
    pytest.importorskip("deepspeed")
    ok = {"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 5e8}, "bf16": {"enabled": True},
          "flops_profiler": {"enabled": True}, "wall_clock_breakdown": True, "a_key_of_a_newer_deepspeed": 1}
    assert config_from_dict({"deepspeed": ok}).deepspeed == ok


def test_an_empty_mapping_given_with_set_clears_the_configs_one():
    """`--set model_overrides={}` (what the checkpoint error advises) merged into the YAML's sizes and changed
    nothing, so a config with tiny-model sizes could not start from a checkpoint on the command line."""
    path = "recipes/configs/synthetic_demo.yaml"
    assert load_config(path, []).model_overrides  # the demo's tiny sizes
    assert load_config(path, ["model_overrides={}"]).model_overrides == {}
    kept = load_config(path, ["synthetic.hops=5"]).synthetic
    assert kept["hops"] == 5 and kept["n_train"] == load_config(path, []).synthetic["n_train"]  # one key, others kept
