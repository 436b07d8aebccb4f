import dataclasses
import re

import pytest
import yaml

from seqrec.config import (ALIASES, LEAVES, SECTIONS, Config, ConfigError, DataConfig, DistConfig, EvalConfig,
                           ModelConfig, TrainConfig, check_with_data, from_dict, parse_config, to_dict)


def test_seed_defaults_with_a_dataset():
    cfg = parse_config(["--dataset", "ml-1m"])
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.lr_decay_step, cfg.train.lr_decay_rate) == (128, 0.001, 1000, 0.95)
    assert (cfg.model.maxlen, cfg.model.hidden_units, cfg.model.num_blocks, cfg.model.num_heads) == (200, 50, 2, 2)
    assert (cfg.train.warmup_steps, cfg.train.num_epochs, cfg.model.dropout_rate) == (100, 1000, 0.2)
    assert (cfg.model.time_span, cfg.model.time_unit, cfg.model.mhc_expansion_rate) == (100, "hour", 4)
    assert (cfg.model.mhc_sinkhorn_iter, cfg.model.mhc_init_gate) == (20, 0.01)
    assert (cfg.model.block, cfg.model.ffn_mult) == ("post", 1)
    assert cfg.model.time and cfg.model.mhc  # the seed's default model is TiSASRec + mHC


def test_no_dataset_uses_demo_preset_but_flags_win():
    cfg = parse_config([])
    assert cfg.data.dataset == "demo" and cfg.model.maxlen == 50
    assert parse_config(["--maxlen", "30"]).model.maxlen == 30


def test_yaml_then_cli_override_and_boolean_negation(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "x", "model": {"norm_first": True, "hidden_units": 64}, "lr": 0.01}))
    cfg = parse_config(["--config", str(path), "--lr", "0.002"])
    assert cfg.model.block == "pre" and cfg.model.hidden_units == 64 and cfg.train.lr == 0.002
    assert parse_config(["--config", str(path), "--no_norm_first"]).model.block == "post"
    assert parse_config(["--config", str(path), "--block", "ligr"]).model.block == "ligr"


def test_norm_first_is_an_alias_of_block_pre():
    """The seed's flag, and the key old config.yaml files and checkpoints stored: read as block,
    never written (an old run directory keeps loading; to_dict holds only block)."""
    old_run = {"model": {"norm_first": True, "hidden_units": 16}, "train": {"lr": 0.01}}
    cfg = from_dict(old_run)
    assert cfg.model.block == "pre" and "norm_first" not in to_dict(cfg)["model"]
    assert from_dict({"model": {"norm_first": False}}).model.block == "post"
    assert from_dict({"norm_first": "true"}).model.block == "pre"  # flat, and YAML-ish text
    assert parse_config(["--dataset", "x", "--norm_first"]).model.block == "pre"
    assert parse_config(["--dataset", "x", "--no_norm_first"]).model.block == "post"
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("source", ["flags", "mapping"])
def test_block_and_its_alias_together_are_refused(source):
    with pytest.raises(ConfigError, match="'norm_first' is an alias of 'block'; give one of them") as err:
        if source == "flags":
            parse_config(["--dataset", "x", "--norm_first", "--block", "ligr"])
        else:
            from_dict({"model": {"block": "ligr", "norm_first": True}})
    assert "\n" not in str(err.value)


def test_seed_compat_flags():
    cfg = parse_config(["--dataset", "x", "--use_amp", "--local-rank=3", "--no_time", "--no_mhc", "--num_workers", "8"])
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
    (["--block", "gated"], "block must be one of post, pre, ligr; got 'gated'"),
    (["--ffn_mult", "0"], "ffn_mult must be positive"),
    (["--inference_only"], "needs --state_dict_path"),
    (["--resume", "--overwrite"], "contradict"),
    (["--select_metric", "NDCG@10"], "select_metric"),
    # refused at start-up, not by a KeyError after the first validation
    (["--select_metric", "sampled/FOO@10"], "select_metric must be a metric the evaluation reports"),
    (["--select_metric", "full/NDCG@50"], r"K in topk \[1, 5, 10, 20\]; got 'full/NDCG@50'"),
    (["--topk", "5,10", "--select_metric", "full/Recall@20"], "select_metric"),
    (["--select_metric", "sampled/NDCG@20"], "select_metric"),  # the sampled protocol reports @10 only
    # NaN passed every `<= 0` test and trained with lr 0 / no penalty
    (["--lr", "nan"], "'lr' expects float \\(finite\\), got 'nan'"),
    (["--l2_emb", "nan"], "'l2_emb' expects float"),
    (["--grad_clip", "inf"], "'grad_clip' expects float"),
    (["--gbce_t=-inf"], "'gbce_t' expects float"),
    (["--dropout_rate", "1e400"], "'dropout_rate' expects float"),
    (["--device", "foo"], "device must be cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "mps"], "device must be cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "device must be"),
    (["--seed", "12345678901234567890123"], "'seed' expects int \\(64-bit\\)"),  # torch.manual_seed's traceback
    (["--seed", str(2**63)], "'seed' expects int"),
    (["--seed", "-1"], r"seed must be in \[0, 2\*\*63\)"),
    (["--eval_seed", "-5"], "eval_seed must be in"),
    (["--master_port", "70000"], "master_port must be a TCP port"),
    (["--backend", "ncl"], "backend must be one of nccl, gloo, mpi, ucc; got 'ncl'"),  # failed at init_process_group
    (["--topk", "1,x"], "'topk' expects list of ints"),
    (["--time_unit", "a\nb"], "time_unit must be one of .*'a\\\\nb'"),  # repr: still one line
])
def test_invalid_values_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(["--dataset", "x", *argv])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("section, values, message", [
    (DataConfig, {"num_workers": -1}, "num_workers must be >= 0, got -1"),
    (ModelConfig, {"mhc_expansion_rate": 9}, "mhc_expansion_rate must be in 1..8, got 9"),
    (ModelConfig, {"time_unit": "week"}, "time_unit must be one of second, minute, hour, day, personal; got 'week'"),
    (TrainConfig, {"lr_decay_rate": 0.0}, "lr_decay_rate must be in (0, 1], got 0.0"),
    (TrainConfig, {"device": "tpu"}, "device must be cpu, cuda or cuda:N, got 'tpu'"),
    (EvalConfig, {"topk": []}, "topk must be positive integers, got []"),
    (DistConfig, {"master_port": 0}, "master_port must be a TCP port in 1..65535, got 0"),
])
def test_each_section_validates_its_own_fields(section, values, message):
    section().validate()  # the defaults, and an empty optional field, pass
    with pytest.raises(ConfigError, match=re.escape(message)):
        section(**values).validate()


def test_run_switches_of_older_configs_and_checkpoints_still_load(tmp_path):
    """Run directories and checkpoints written before the run section hold resume, overwrite,
    inference_only and state_dict_path under train: they load into run, which alone stores them."""
    old = {"train": {"lr": 0.01, "resume": True, "overwrite": False, "inference_only": True,
                     "state_dict_path": "r/best.pt"}}
    cfg = from_dict(old)
    assert (cfg.run.resume, cfg.run.overwrite, cfg.run.inference_only, cfg.run.state_dict_path) == (
        True, False, True, "r/best.pt")
    assert cfg.train.lr == 0.01
    stored = to_dict(cfg)
    assert set(stored["run"]) == {"resume", "overwrite", "inference_only", "state_dict_path"}
    assert not set(stored["run"]) & set(stored["train"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": "x"}, **old}))
    assert parse_config(["--config", str(path), "--no_resume"]).run == from_dict(
        {"run": {"inference_only": True, "state_dict_path": "r/best.pt"}}).run
    with pytest.raises(ConfigError, match="unknown key 'run.lr'"):
        from_dict({"run": {"lr": 0.1}})  # run holds only its own switches


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


@pytest.mark.parametrize("argv, field, value", [
    (["--device", "cpu"], "train.device", "cpu"),
    (["--device", "cuda:3"], "train.device", "cuda:3"),  # need not exist here: resolve_device checks that
    (["--seed", str(2**63 - 1)], "train.seed", 2**63 - 1),
    (["--topk", "5,50", "--select_metric", "full/MRR@50"], "eval.topk", [5, 50]),
    (["--select_metric", "sampled/HR@10"], "eval.select_metric", "sampled/HR@10"),
    (["--backend", "gloo"], "dist.backend", "gloo"),
])
def test_valid_edge_values_pass(argv, field, value):
    section, name = field.split(".")
    assert getattr(getattr(parse_config(["--dataset", "x", *argv]), section), name) == value


@pytest.mark.parametrize("text, message", [
    ("lr: .nan\n", "'lr' expects float"),
    ("seed: true\n", "'seed' expects int"),  # YAML's yes/true is not the number 1
    ("lr: yes\n", "'lr' expects float"),
    ("topk: [1.5, 10]\n", "'topk' expects list of ints"),  # int(1.5) would be 1
    ("dataset: [a, b]\n", "'dataset' expects str"),
    ("dataset: 2020-01-01\n", "'dataset' expects str"),  # YAML makes it a date
    ("lr: 1" + "0" * 400 + "\n", "'lr' expects float"),  # float() overflows
    ("model: 5\n", "section 'model' must be a mapping"),
    ("when: 2020-13-45\n", "invalid YAML \\(month must be in 1..12\\)"),
    ("a: " + "[" * 3000 + "\n", "invalid YAML"),
    ("? [a, b]\n: 1\n", "invalid YAML"),
    ('"a\\nb": 1\n', r"unknown key 'a\\nb'"),
], ids=["nan", "bool-int", "bool-float", "float-list", "list-str", "date-str", "huge-float", "section", "bad-date",
        "deep", "complex-key", "newline-key"])
def test_yaml_values_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(["--config", str(path), "--dataset", "x"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"lr: 0.1\n\x00\x00", "lr: caf\xe9\n".encode("latin-1")],
                         ids=["all-bytes", "nul", "latin-1"])
def test_binary_config_file(tmp_path, content):
    """A binary file as --config was a UnicodeDecodeError traceback."""
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="not a YAML config \\(binary data or not UTF-8 text\\)"):
        parse_config(["--config", str(path)])


def test_yaml_with_a_utf8_bom(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("\ufeffdataset: x\nlr: 0.01\n".encode())
    assert parse_config(["--config", str(path)]).train.lr == 0.01


def test_eval_negatives_checked_against_the_catalogue():
    cfg = parse_config(["--dataset", "x", "--eval_negatives", "40"])
    check_with_data(cfg, 41, "toy.txt")  # each user has seen its target: 40 items may be unseen
    with pytest.raises(ConfigError, match="--eval_negatives 40 is more than the 39 items a user of toy.txt"):
        check_with_data(cfg, 40, "toy.txt")


def every_leaf_changed() -> Config:
    """A Config in which every leaf differs from its default (not a run one could start: the
    round trip does not validate, so contradicting switches may both be on)."""
    cfg = Config()
    changed = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2 if v else 0.25}
    strings = {"block": "ligr", "time_unit": "day", "amp": "bf16", "compile_mode": "max-autotune",
               "select_metric": "full/NDCG@20", "backend": "gloo", "device": "cuda:1", "loss": "ce",
               "mlflow": "sqlite:///m.db", "state_dict_path": "w.pt"}
    for name, (section, f, typ) in LEAVES.items():
        if name in ALIASES:
            continue
        value = getattr(getattr(cfg, section), name)
        if name in strings:
            new = strings[name]
        elif type(value) in changed:
            new = changed[type(value)](value)
        elif isinstance(value, list):
            new = [*value, value[-1] + 5]
        else:  # the other optional strings: any name will do
            new = f"{name}-x"
        setattr(getattr(cfg, section), name, new)
    return cfg


def test_round_trip_through_dict_keeps_every_leaf():
    cfg = every_leaf_changed()
    for section in SECTIONS:  # the round trip below could not miss a section or a field
        fields = dataclasses.asdict(getattr(cfg, section))
        defaults = dataclasses.asdict(getattr(Config(), section))
        assert [n for n in fields if fields[n] == defaults[n]] == [], section
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


def test_readme_flag_table_matches_the_code():
    from conftest import REPO
    from seqrec.config import flag_table
    assert flag_table() in (REPO / "README.md").read_text(), "README flag table is stale: paste `python -m seqrec.config`"
