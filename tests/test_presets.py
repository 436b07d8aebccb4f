"""The named recipes in seqrec/presets/ (`--preset NAME`, config.apply_preset): what each sets,
the precedence defaults < preset < demo fallback < --config < flags, the unknown-name error,
and one epoch of every preset on the demo data."""
from __future__ import annotations

import math

import pytest
import yaml

from seqrec.cli import run
from seqrec.config import (DEMO_PRESET, PRESETS, Config, ConfigError, apply_preset, load_yaml, parse_config,
                           preset_names, validate)

NAMES = ["esasrec", "gsasrec", "sasrec", "tisasrec"]
SWITCHES = ("time", "mhc", "block", "loss")  # every preset names each of these itself
NEVER = ("dataset", "data_path", "train_dir", "user_col", "item_col", "time_col")


def test_the_packaged_presets():
    assert preset_names() == NAMES  # the demo preset, which supplies data, is not a named recipe
    assert DEMO_PRESET.is_file() and all((PRESETS / f"{name}.yaml").is_file() for name in NAMES)


def recipe(name: str):
    cfg = apply_preset(Config(), name)
    return cfg.model, cfg.train


@pytest.mark.parametrize("name", NAMES)
def test_each_preset_sets_every_switch_and_no_data(name):
    path = PRESETS / f"{name}.yaml"
    values = load_yaml(path)
    assert set(SWITCHES) <= values.keys() and not set(NEVER) & values.keys()
    comments = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("arXiv" in line for line in comments) and any("From the paper" in line for line in comments)
    validate(apply_preset(Config(), name))


def test_the_recipes_values():
    m, t = recipe("gsasrec")
    assert (t.loss, t.num_negatives, t.gbce_t, m.block, m.time, m.mhc) == ("gbce", 128, 0.75, "post", False, False)
    m, t = recipe("esasrec")
    assert (m.block, m.ffn_mult, t.loss, t.num_negatives, t.shared_negatives, t.logq) == (
        "ligr", 4, "sampled_softmax", 256, True, False)
    m, t = recipe("tisasrec")
    assert (m.time, m.time_unit, m.time_span, m.block, t.loss) == (True, "personal", 256, "post", "bce")
    m, t = recipe("sasrec")
    assert (m.time, m.mhc, m.block, m.num_heads, m.maxlen, t.loss, t.num_negatives) == (
        False, False, "post", 1, 200, "bce", 1)


def test_precedence_preset_then_demo_then_config_then_flags(tmp_path):
    with_data = parse_config(["--preset", "esasrec", "--dataset", "x"])
    assert (with_data.model.block, with_data.model.hidden_units, with_data.model.maxlen) == ("ligr", 64, 200)
    assert with_data.train.train_dir is None  # a recipe never sets the run directory
    # no data given: the demo supplies it and sizes the run; the recipe's model stays
    demo = parse_config(["--preset", "esasrec"])
    assert (demo.data.dataset, demo.model.maxlen, demo.train.num_epochs) == ("demo", 50, 30)
    assert (demo.model.block, demo.model.hidden_units, demo.train.loss) == ("ligr", 64, "sampled_softmax")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "x", "hidden_units": 32, "model": {"block": "pre"}}))
    from_file = parse_config(["--preset", "esasrec", "--config", str(path)])
    assert (from_file.model.hidden_units, from_file.model.block, from_file.model.ffn_mult) == (32, "pre", 4)
    flags = parse_config(["--preset", "esasrec", "--config", str(path), "--hidden_units", "24", "--norm_first"])
    assert (flags.model.hidden_units, flags.model.block) == (24, "pre")
    assert parse_config(["--config", str(path), "--preset", "sasrec", "--no_norm_first"]).model.block == "post"


@pytest.mark.parametrize("name", ["nope", "demo", "ESASREC"])
def test_unknown_preset_is_a_one_line_error_listing_the_presets(name):
    for call in (lambda: parse_config(["--preset", name]), lambda: apply_preset(Config(), name)):
        with pytest.raises(ConfigError, match=f"unknown preset '{name}'; available: esasrec, gsasrec, sasrec, "
                                              f"tisasrec$") as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_trains_one_epoch_on_the_demo_data(name, tmp_path):
    """The preset's model switches and loss as shipped, only the sizes cut so it takes seconds."""
    cfg = parse_config(["--preset", name, "--train_dir", str(tmp_path / "run"), "--maxlen", "20",
                        "--hidden_units", "16", "--num_epochs", "1", "--device", "cpu", "--eval_negatives", "50"])
    shipped = apply_preset(Config(), name)
    assert cfg.data.dataset == "demo"
    for switch in SWITCHES:
        section = "train" if switch == "loss" else "model"
        assert getattr(getattr(cfg, section), switch) == getattr(getattr(shipped, section), switch)
    assert (cfg.train.num_negatives, cfg.train.shared_negatives) == (shipped.train.num_negatives,
                                                                    shipped.train.shared_negatives)
    results = run(cfg)
    for metric in ("sampled/NDCG@10", "full/NDCG@10"):
        assert 0 < results["test"][metric] < 1 and math.isfinite(results["test"][metric])
