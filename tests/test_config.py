import pytest
import yaml

from seqrec.config import Config, ConfigError, from_dict, parse_config, to_dict


def test_seed_defaults_with_a_dataset():
    cfg = parse_config(["--dataset", "ml-1m"])
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.lr_decay_step, cfg.train.lr_decay_rate) == (128, 0.001, 1000, 0.95)
    assert (cfg.model.maxlen, cfg.model.hidden_units, cfg.model.num_blocks, cfg.model.num_heads) == (200, 50, 2, 2)
    assert (cfg.train.warmup_steps, cfg.train.num_epochs, cfg.model.dropout_rate) == (100, 1000, 0.2)
    assert (cfg.model.time_span, cfg.model.time_unit, cfg.model.mhc_expansion_rate) == (100, "hour", 4)
    assert (cfg.model.mhc_sinkhorn_iter, cfg.model.mhc_init_gate, cfg.model.norm_first) == (20, 0.01, False)
    assert cfg.model.time and cfg.model.mhc  # the seed's default model is TiSASRec + mHC


def test_no_dataset_uses_demo_preset_but_flags_win():
    cfg = parse_config([])
    assert cfg.data.dataset == "demo" and cfg.model.maxlen == 50
    assert parse_config(["--maxlen", "30"]).model.maxlen == 30


def test_yaml_then_cli_override_and_boolean_negation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "x", "model": {"norm_first": True, "hidden_units": 64}, "lr": 0.01}))
    cfg = parse_config(["--config", str(path), "--lr", "0.002"])
    assert cfg.model.norm_first and cfg.model.hidden_units == 64 and cfg.train.lr == 0.002
    assert not parse_config(["--config", str(path), "--no_norm_first"]).model.norm_first


def test_seed_compat_flags():
    cfg = parse_config(["--dataset", "x", "--use_amp", "--local-rank=3", "--no_time", "--no_mhc"])
    assert cfg.train.amp == "auto" and not cfg.model.time and not cfg.model.mhc
    assert parse_config(["--dataset", "x", "--no_use_amp"]).train.amp == "off"
    assert parse_config(["--dataset", "x", "--local_rank", "1"]).data.dataset == "x"


@pytest.mark.parametrize("argv, message", [
    (["--hidden_units", "50", "--num_heads", "3"], "divisible by num_heads"),
    (["--maxlen", "0"], "maxlen must be positive"),
    (["--lr", "-1"], "lr must be positive"),
    (["--time_unit", "week"], "time_unit must be one of"),
    (["--batch_size", "ten"], "'batch_size' expects int"),
    (["--dropout_rate", "1.5"], "dropout_rate"),
    (["--amp", "fp8"], "amp must be one of"),
    (["--inference_only"], "needs --state_dict_path"),
    (["--resume", "--overwrite"], "contradict"),
    (["--select_metric", "NDCG@10"], "select_metric"),
])
def test_invalid_values_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(["--dataset", "x", *argv])
    assert "\n" not in str(err.value)


def test_unknown_keys_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hiden_units: 10\n")
    with pytest.raises(ConfigError, match="unknown key 'hiden_units'"):
        parse_config(["--config", str(path)])
    path.write_text("model:\n  lr: 0.1\n")  # a real key in the wrong section
    with pytest.raises(ConfigError, match="unknown key 'model.lr'"):
        parse_config(["--config", str(path)])
    with pytest.raises(SystemExit):
        parse_config(["--no_such_flag"])


def test_round_trip_through_dict():
    cfg = Config()
    cfg.model.hidden_units = 64
    assert from_dict(to_dict(cfg)) == cfg


def test_readme_flag_table_matches_the_code():
    from conftest import REPO
    from seqrec.config import flag_table
    assert flag_table() in (REPO / "README.md").read_text(), "README flag table is stale: paste `python -m seqrec.config`"
