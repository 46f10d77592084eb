"""Config: env parsing, validation, typo warnings, --help, batch resolution."""

import dataclasses
import subprocess
import sys

import pytest

import train_gpt
from conftest import ROOT, clean_env
from train_gpt import Config, ConfigError, load_config


def test_defaults_are_the_challenge_baseline():
    cfg, notes = load_config({}, world_size=8)
    assert (cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_mult) == (9, 512, 8, 4, 2.0)
    assert (cfg.vocab_size, cfg.train_seq_len, cfg.train_batch_tokens) == (1024, 1024, 524288)
    assert cfg.max_wallclock_seconds == 600 and cfg.artifact_limit_bytes == 16_000_000
    assert cfg.grad_accum_steps == 1 and notes == []


@pytest.mark.parametrize("world,accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_grad_accum_keeps_the_global_batch(world, accum):
    cfg, notes = load_config({}, world_size=world)
    assert cfg.grad_accum_steps == accum and cfg.train_batch_tokens == 524288 and notes == []


def test_world_size_that_does_not_divide_rounds_the_batch_and_says_so():
    cfg, notes = load_config({}, world_size=6)
    assert cfg.train_batch_tokens % (6 * cfg.grad_accum_steps * cfg.train_seq_len) == 0
    assert abs(cfg.train_batch_tokens - 524288) <= 6 * 1024 // 2
    assert len(notes) == 1 and "rounded from 524288" in notes[0]


def test_explicit_accumulation_must_divide_the_batch():
    with pytest.raises(ConfigError, match="TRAIN_BATCH_TOKENS"):
        load_config({"GRAD_ACCUM_STEPS": "3"}, world_size=1)


def test_env_values_are_typed():
    cfg, _ = load_config({"MODEL_DIM": "256", "MLP_MULT": "3", "TIE_EMBEDDINGS": "0", "RUN_ID": "x"})
    assert cfg.model_dim == 256 and cfg.mlp_mult == 3.0 and cfg.tie_embeddings is False and cfg.run_id == "x"


@pytest.mark.parametrize("env,name", [
    ({"NUM_LAYERS": "nine"}, "NUM_LAYERS"),
    ({"NUM_LAYERS": "0"}, "NUM_LAYERS"),
    ({"MATRIX_LR": "-1"}, "MATRIX_LR"),
    ({"MAX_WALLCLOCK_SECONDS": "-5"}, "MAX_WALLCLOCK_SECONDS"),
    ({"LOGIT_SOFTCAP": "nan"}, "LOGIT_SOFTCAP"),
    ({"TIE_EMBEDDINGS": "maybe"}, "TIE_EMBEDDINGS"),
    ({"DEVICE": "tpu"}, "DEVICE"),
    ({"NUM_HEADS": "3"}, "NUM_HEADS"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"),
    ({"TRAIN_BATCH_TOKENS": "100"}, "TRAIN_BATCH_TOKENS"),
    ({"RUN_ID": "../x"}, "RUN_ID"),
    ({"QUANT": "int3"}, "QUANT"),
    ({"EVAL_STRIDE": "2048", "TRAIN_SEQ_LEN": "1024"}, "EVAL_STRIDE"),
    ({"ACTIVATION": "gelu"}, "ACTIVATION"),
    ({"DEPTH_SCHEDULE": "2@0.1,3@0.5"}, "DEPTH_SCHEDULE"),
    ({"DEPTH_SCHEDULE": "2@0,3@0.5,4@0.4"}, "DEPTH_SCHEDULE"),
    ({"DEPTH_SCHEDULE": "2@0,x@0.5"}, "DEPTH_SCHEDULE"),
    ({"DEPTH_SCHEDULE": "2@0,3@1.5"}, "DEPTH_SCHEDULE"),
    ({"DEPTH_SCHEDULE": "4@0,3@0.5"}, "DEPTH_SCHEDULE"),
    ({"DEPTH_SCHEDULE": "2@0,3@0.5", "NUM_REPEATS": "4"}, "NUM_REPEATS"),
    ({"SWA_ENABLED": "1", "EMA_DECAY": "0.99"}, "EMA_DECAY"),
    ({"EMA_DECAY": "1.5"}, "EMA_DECAY"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert str(err.value).startswith(name)


def test_depth_schedule_sets_the_full_depth():
    cfg, _ = load_config({"DEPTH_SCHEDULE": "2@0,3@0.4,4@0.65"})
    assert cfg.num_repeats == 4
    assert cfg.depth_phases == ((2, 0.0), (3, 0.4), (4, 0.65))
    assert load_config({"NUM_REPEATS": "3"})[0].depth_phases == ((3, 0.0),)


def test_presets_set_defaults_that_env_vars_override():
    cfg, _ = load_config({"PRESET": "recurrent"})
    assert (cfg.num_layers, cfg.model_dim, cfg.num_repeats, cfg.xsa_last_n, cfg.num_value_embeds) == (3, 832, 4, 4, 2)
    assert cfg.activation == "leaky_relu2" and cfg.swa_enabled and cfg.muon_wd == 0.04 and cfg.preset == "recurrent"
    cfg, _ = load_config({"PRESET": "recurrent", "MODEL_DIM": "512", "DEPTH_SCHEDULE": "1@0,2@0.5"})
    assert cfg.model_dim == 512 and cfg.num_repeats == 2 and cfg.num_layers == 3
    baseline = dataclasses.asdict(load_config({"PRESET": "baseline", "RUN_ID": "x"})[0])
    assert baseline == {**dataclasses.asdict(load_config({"RUN_ID": "x"})[0]), "preset": "baseline"}
    with pytest.raises(ConfigError, match="PRESET"):
        load_config({"PRESET": "fastest"})


def test_typo_is_warned_with_the_closest_name():
    _, notes = load_config({"NUM_LAYER": "4", "PATH": "/bin", "MASTER_PORT": "1"})
    assert notes == ["warning: env var NUM_LAYER is not a setting of train_gpt.py; did you mean NUM_LAYERS?"]


def run_cli(env, *args):
    return subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), *args], env={**clean_env(), **env},
                          capture_output=True, text=True, timeout=60)


def test_help_lists_every_variable_with_its_default():
    out = run_cli({}, "--help")
    assert out.returncode == 0
    for name, f in train_gpt.CONFIG_FIELDS.items():
        line = next(line for line in out.stdout.splitlines() if line.strip().startswith(name + " "))
        assert repr(f.default) in line and f.metadata["help"][:20] in line


def test_bad_value_exits_2_before_any_work(tmp_path):
    out = run_cli({"MODEL_DIM": "abc", "LOG_DIR": str(tmp_path / "logs")})
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "MODEL_DIM='abc'" in out.stderr
    assert not (tmp_path / "logs").exists()


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.num_layers = 3


def test_the_settings_reference_is_generated_from_the_code():
    """docs/settings.md lists every setting and preset as Config and PRESETS say."""
    from conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "settings_doc.py"), "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    page = (ROOT / "docs" / "settings.md").read_text()
    assert all(f"`{name}`" in page for name in train_gpt.CONFIG_FIELDS) and all(f"`{name}`" in page for name in train_gpt.PRESETS)


def test_the_claimed_score_must_be_an_enabled_method_and_runs_last():
    with pytest.raises(train_gpt.ConfigError, match="SCORE_METHOD=ttt: that evaluation is off \\(set TTT_STEPS\\)"):
        train_gpt.load_config({"SCORE_METHOD": "ttt", "EVAL_STRIDE": "64"})
    cfg, _ = train_gpt.load_config({"SCORE_METHOD": "sliding", "EVAL_STRIDE": "64", "HEDGE_ENABLED": "1"})
    assert cfg.eval_methods == ("hedge", "sliding")
    cfg, _ = train_gpt.load_config({"EVAL_STRIDE": "64", "HEDGE_ENABLED": "1"})
    assert cfg.eval_methods == ("sliding", "hedge") and cfg.score_method == "roundtrip"
