"""One typed configuration tree for every entry point.

Every field carries a one-line help text, which is also the command-line help, so
the flag table in the README, ``--help`` and the YAML keys cannot drift apart.
Values are resolved in one order: dataclass defaults < ``--preset NAME`` (a packaged
recipe, seqrec/presets/NAME.yaml) < the demo preset (only when no data is given) <
``--config FILE.yaml`` < command-line flags. The demo sits above the named preset so that
``seqrec train --preset esasrec`` without data is the demo's quick run of that recipe: the
demo sets only the data, the run directory and the run's size, a recipe only the model and
its training.
Flag names are the seed's flat names (``--hidden_units``); the tree only groups
them, so every leaf name is unique across sections. A field declares the rules its value
must meet beside its help (its section's validate() checks them); the rules that tie
fields together are one pass, check_combinations, and validate(cfg) runs both.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TIME_UNITS = ("second", "minute", "hour", "day", "personal")
AMP_MODES = ("auto", "off", "bf16", "fp16")
LOSSES = ("bce", "gbce", "sampled_softmax", "ce")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
BACKENDS = ("nccl", "gloo", "mpi", "ucc")  # torch.distributed's process-group backends
BLOCKS = ("post", "pre", "ligr")
PRESETS = importlib.resources.files("seqrec") / "presets"  # package data: the named recipes and the demo
DEMO_PRESET = PRESETS / "demo.yaml"  # launch/configs/ mirrors it
_INT64 = 2**63
DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")  # the devices the trainer and `seqrec recommend` run on


class ConfigError(ValueError):
    """An invalid configuration; the message is one line meant for the user."""


@dataclass(frozen=True)
class Rule:
    """A condition one field's value must meet, and how its error says so:
    '<field> must be <must_be>, got <value>'. An empty optional field (None) means "the
    default behaviour" and meets every rule."""
    holds: Callable[[Any], bool]
    must_be: str
    got: str = ", got"

    def check(self, name: str, value: Any) -> None:
        if value is not None and not self.holds(value):
            shown = _quote(value) if isinstance(value, str) else value
            raise ConfigError(f"{name} must be {self.must_be}{self.got} {shown}")


def one_of(allowed: tuple[str, ...]) -> Rule:
    """The rule of a field that names one of a fixed set of choices (its error lists them)."""
    return Rule(lambda value: value in allowed, f"one of {', '.join(allowed)}", got="; got")


POSITIVE = Rule(lambda value: value > 0, "positive")
NON_NEGATIVE = Rule(lambda value: value >= 0, ">= 0")
PROBABILITY = Rule(lambda value: 0 <= value < 1, "in [0, 1)")  # dropout: 1 would drop everything
# seqrec.losses' registry (LOSSES and any loss a user registered), read when checked: the losses
# import torch and the data layer, which imports this module.
REGISTERED_LOSS = Rule(lambda value: value in importlib.import_module("seqrec.losses").LOSSES,
                       f"one of {', '.join(LOSSES)} or a loss registered with seqrec.losses.register", got="; got")
SEED = Rule(lambda value: 0 <= value < _INT64, "in [0, 2**63)")  # hashed as int64, given to torch.manual_seed


def opt(default: Any, help: str, *rules: Rule) -> Any:
    """A dataclass field whose help text doubles as CLI help and documentation, and whose
    rules its section's validate() checks."""
    metadata = {"help": help, "rules": rules}
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class Section:
    """The base of every config section: validation lives with the fields it checks."""

    def validate(self) -> None:
        """Check each field alone, by the rules declared beside it; the rules on how fields
        combine, within a section or across sections, are in check_combinations."""
        for f in dataclasses.fields(self):
            for rule in f.metadata["rules"]:
                rule.check(f.name, getattr(self, f.name))


@dataclass
class DataConfig(Section):
    dataset: str | None = opt(None, "dataset name: reads data/<name>.txt ('demo' = the embedded demo data)")
    data_path: str | None = opt(None, "path to any interactions file (ratings.dat, 'user item [timestamp]' text or CSV)")
    user_col: str | None = opt(None, "CSV column holding user ids (default: found by name)")
    item_col: str | None = opt(None, "CSV column holding item ids (default: found by name)")
    time_col: str | None = opt(None, "CSV column holding timestamps (default: found by name)")
    min_user_count: int = opt(0, "drop users with fewer interactions (one pass, as SASRec's preprocessing)",
                              NON_NEGATIVE)
    min_item_count: int = opt(0, "drop items with fewer interactions (one pass, as SASRec's preprocessing)",
                              NON_NEGATIVE)
    num_workers: int = opt(3, "accepted for seed compatibility and ignored: batches are sliced from device tensors, "
                              "so no loader workers run", NON_NEGATIVE)


@dataclass
class ModelConfig(Section):
    maxlen: int = opt(200, "maximum sequence length (the most recent items are kept)", POSITIVE)
    hidden_units: int = opt(50, "embedding and hidden size d", POSITIVE)
    num_blocks: int = opt(2, "number of transformer blocks", POSITIVE)
    num_heads: int = opt(2, "attention heads (must divide hidden_units)", POSITIVE)
    dropout_rate: float = opt(0.2, "dropout on embeddings and sub-layer outputs", PROBABILITY)
    attention_dropout: float = opt(0.0, "dropout on attention weights as in the reference ports "
                                        "(0 keeps PyTorch's fused CPU attention kernel, ~5x faster)", PROBABILITY)
    block: str = opt("post", f"transformer block: {'|'.join(BLOCKS)} (post: LayerNorm after each residual sum, as the "
                             "SASRec port; pre: before each sub-layer; ligr: pre-LN, a learned sigmoid gate on each "
                             "sub-layer's output and a SwiGLU FFN, eSASRec's LiGR layer)", one_of(BLOCKS))
    ffn_mult: int = opt(1, "feed-forward hidden width = ffn_mult x hidden_units (1 = the SASRec port's d -> d; "
                           "eSASRec's LiGR uses 4)", POSITIVE)
    time: bool = opt(True, "TiSASRec time-interval-aware attention (--no_time = SASRec)")
    time_span: int = opt(100, "largest time interval bucket (intervals are clipped to it)", POSITIVE)
    time_unit: str = opt("hour", f"interval unit: {'|'.join(TIME_UNITS)}", one_of(TIME_UNITS))
    mhc: bool = opt(True, "mHC residual: Sinkhorn-constrained hyper-connections (--no_mhc = plain residual)")
    mhc_expansion_rate: int = opt(4, "mHC residual streams n", POSITIVE, Rule(lambda value: value <= 8, "in 1..8"))
    mhc_sinkhorn_iter: int = opt(20, "Sinkhorn-Knopp iterations for H_res", POSITIVE)
    mhc_init_gate: float = opt(0.01, "initial value of the mHC gates alpha", NON_NEGATIVE)
    mhc_no_amp: bool = opt(False, "keep the whole mHC path (coefficients and stream mixing) in fp32 under AMP")
    mhc_native: bool = opt(True, "on CPU, run mHC's per-token work (coefficients, Sinkhorn, mixing, post-LN update, "
                                 "collapse) in a C kernel compiled on first use with $CC (same numbers; PyTorch ops "
                                 "without a compiler, on GPU and under bf16/fp16 autocast unless --mhc_no_amp)")


@dataclass
class TrainConfig(Section):
    train_dir: str | None = opt(None, "run directory for config, metrics and checkpoints "
                                      "(default: runs/<dataset name or data file stem>)")
    batch_size: int = opt(128, "global batch size (users per step, split evenly over ranks)", POSITIVE)
    grad_accum_steps: int = opt(1, "micro-batches per rank and step (the global batch stays --batch_size)", POSITIVE)
    length_buckets: int = opt(0, "split each micro-batch into this many groups of similar history length, each cut "
                                 "to its longest history (same gradient, less padding; 1 = off; 0 = auto: 8 on "
                                 "CPU, 1 on CUDA)", NON_NEGATIVE)
    lr: float = opt(0.001, "peak learning rate (Adam, betas 0.9/0.98)", POSITIVE)
    lr_decay_step: int = opt(1000, "multiply the LR by lr_decay_rate every this many epochs", POSITIVE)
    lr_decay_rate: float = opt(0.95, "step-decay factor", Rule(lambda value: 0 < value <= 1, "in (0, 1]"))
    warmup_steps: int = opt(100, "linear warmup steps (0 = none)", NON_NEGATIVE)
    l2_emb: float = opt(0.0, "L2 penalty on the item embedding (times its squared norm)", NON_NEGATIVE)
    grad_clip: float = opt(0.0, "clip the gradient norm to this value (0 = off)", NON_NEGATIVE)
    num_epochs: int = opt(1000, "training epochs", POSITIVE)
    loss: str = opt("bce", f"training loss: {'|'.join(LOSSES)} (ce = full softmax over all items)", REGISTERED_LOSS)
    num_negatives: int = opt(0, "sampled negatives per position (0 = the loss's default: bce 1, gbce 256, "
                                "sampled_softmax 256)", NON_NEGATIVE)
    shared_negatives: bool = opt(False, "sampled losses: one set of num_negatives items for the whole step, scored "
                                        "with one matmul, instead of a set per position")
    logq: bool = opt(False, "sampled_softmax: draw negatives in proportion to training popularity and subtract "
                            "log q from the logits (logQ correction)")
    gbce_t: float = opt(0.75, "gBCE calibration t in [0, 1] (0 = plain BCE)",
                        Rule(lambda value: 0 <= value <= 1, "in [0, 1]"))
    ce_chunk_size: int = opt(8192, "items per chunk of the full cross-entropy (bounds its memory)", POSITIVE)
    seed: int = opt(42, "seed for initialisation, data order, negatives and dropout", SEED)
    eval_every: int = opt(20, "validate every this many epochs (and after the last)", POSITIVE)
    early_stop_patience: int = opt(0, "stop after this many validations without improvement (0 = off)", NON_NEGATIVE)
    device: str | None = opt(None, "cpu, cuda or cuda:N (default: cuda when available, else cpu)",
                             Rule(lambda value: DEVICE.fullmatch(value) is not None, "cpu, cuda or cuda:N"))
    amp: str = opt("auto", f"mixed precision: {'|'.join(AMP_MODES)} (auto = bf16 on Ampere+, fp16 on older CUDA, off on CPU)",
                   one_of(AMP_MODES))
    compile: bool = opt(False, "torch.compile the training forward and loss as one graph (for GPUs; on CPU it was "
                               "measured slower, see docs/PERFORMANCE.md)")
    compile_mode: str = opt("default", f"torch.compile mode with --compile: {'|'.join(COMPILE_MODES)} "
                                       "(reduce-overhead = CUDA graphs, one process only)", one_of(COMPILE_MODES))
    tf32: bool = opt(True, "CUDA: TF32 tensor cores for fp32 matmuls and convolutions (10-bit mantissa inputs, "
                           "fp32 accumulation)")
    deterministic: bool = opt(False, "deterministic algorithms (torch.use_deterministic_algorithms, "
                                     "CUBLAS_WORKSPACE_CONFIG=:4096:8; slower on GPU, see docs/DISTRIBUTED_TRAINING.md)")
    max_bad_steps: int = opt(5, "stop after this many consecutive steps with a non-finite loss or gradient "
                                "(skipped on the device; counted at each --log_every boundary and epoch end)", POSITIVE)
    log_every: int = opt(50, "steps between loss/throughput log rows", POSITIVE)
    save_every_steps: int = opt(0, "also write latest.pt every this many steps, mid-epoch (0 = at epoch ends only)",
                                NON_NEGATIVE)


@dataclass
class RunConfig(Section):
    """What this launch does with the run directory: switches of one command line, not settings
    of the model or its training (a resumed run is the same run). Config files and checkpoints
    written before this section existed hold them under train (see FORMER_SECTIONS)."""
    resume: bool = opt(False, "continue the run in train_dir from its latest checkpoint "
                              "(implied after a torchrun --max-restarts restart)")
    overwrite: bool = opt(False, "start afresh in a train_dir that already holds checkpoints")
    inference_only: bool = opt(False, "only evaluate the model in state_dict_path")
    state_dict_path: str | None = opt(None, "checkpoint to evaluate with --inference_only")


@dataclass
class EvalConfig(Section):
    eval_negatives: int = opt(100, "negatives per user in the sampled protocol", POSITIVE)
    eval_seed: int = opt(0, "seed of the sampled-protocol negatives (shared by all runs, independent of --seed)", SEED)
    eval_batch_size: int = opt(0, "users per evaluation batch (0: 512 on GPU, 64 on CPU, where larger batches' "
                                  "activations exceed malloc's 32 MB mmap threshold and are page-faulted in again "
                                  "every batch)", NON_NEGATIVE)
    topk: list = opt([1, 5, 10, 20], "cut-offs K for full-ranking Recall/NDCG/MRR",
                     Rule(lambda value: bool(value) and min(value) > 0, "positive integers"))
    mask_history: bool = opt(False, "full ranking: exclude the user's history from the ranking (papers: off)")
    eval_item_chunk: int = opt(65536, "full ranking: score at most this many items at a time (memory: eval_batch_size "
                                      "x chunk floats; large catalogues take two passes over the chunks)", POSITIVE)
    select_metric: str = opt("sampled/NDCG@10", "validation metric for best checkpoint and early stopping")


@dataclass
class DistConfig(Section):
    multi_gpu: bool = opt(False, "require a torchrun environment and train with DistributedDataParallel")
    backend: str | None = opt(None, "process-group backend (default: nccl on CUDA, gloo on CPU)", one_of(BACKENDS))
    master_port: int = opt(29500, "rendezvous port: train_distributed.sh pins torchrun to it when given; under "
                                  "your own torchrun the launcher's port wins",
                           Rule(lambda value: 1 <= value <= 65535, "a TCP port in 1..65535"))


@dataclass
class TrackConfig(Section):
    tensorboard: bool = opt(False, "write TensorBoard event files into the run directory (pip install 'seqrec[track]')")
    mlflow: str | None = opt(None, "MLflow tracking URI to log the run to: sqlite:///mlflow.db, file:./mlruns or "
                                   "http://host:5000 (pip install 'seqrec[track]')")
    mlflow_experiment: str | None = opt(None, "MLflow experiment (default: the run directory's name)")
    mlflow_log_model: bool = opt(False, "with --mlflow, also store best.pt as an artifact of the MLflow run")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    track: TrackConfig = field(default_factory=TrackConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}

# Names read for the seed's flags and for configs and checkpoints written before the leaf they
# now set: alias -> (leaf, {alias value: leaf value}). Read, never stored: to_dict has only the leaf,
# and a mapping (or command line) that gives both is refused.
ALIASES = {"norm_first": ("block", {True: "pre", False: "post"})}
# Leaves that configs and checkpoints written before their section existed hold elsewhere:
# leaf -> that older section. Read there too, stored only in their own section.
FORMER_SECTIONS = {f.name: "train" for f in dataclasses.fields(RunConfig)}


def _leaves() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Map each leaf name to (section, field, resolved type); an alias follows its leaf, typed bool."""
    out = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (section.name, f, hints[f.name])
            for alias, (leaf, values) in ALIASES.items():
                if leaf == f.name:
                    meaning = ", ".join(f"--{'' if value else 'no_'}{alias} = --{leaf} {target}"
                                        for value, target in values.items())
                    help_text = f"alias: {meaning} (the seed's flag, and the key older configs and checkpoints hold)"
                    out[alias] = (section.name, field(default=False, metadata={"help": help_text}), bool)
    return out


LEAVES = _leaves()



def coerce(name: str, value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or fail with one line."""
    base = typing.get_args(typ)[0] if typing.get_origin(typ) is types.UnionType else typ  # X | None -> X
    if value is None:
        if base is typ:
            raise ConfigError(f"{where}: '{name}' may not be empty")
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is list:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return [_scalar(int, v) for v in items]
        return _scalar(base, value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: float() of a 400-digit int
        raise ConfigError(f"{where}: '{name}' expects {_kind(base)}, got {_quote(value)}") from None


def _scalar(base: type, value: Any) -> Any:
    """One int, float or str from a YAML scalar or a flag's text; ValueError for anything else.

    YAML turns `yes` into True and `2020-01-01` into a date: neither is silently a number or
    a name. Numbers must be finite and integers fit the int64 that tensors and the hashing
    use, so no NaN, inf or 30-digit value reaches the code that would misuse it."""
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):  # Real: numpy's numbers too
        raise ValueError
    if base is str:
        if "\x00" in str(value):  # no path or name holds a NUL; os calls would raise on it
            raise ValueError
        return str(value)
    if base is int and not isinstance(value, (str, numbers.Integral)) and not float(value).is_integer():
        raise ValueError
    number = base(value)
    if not math.isfinite(number) or (base is int and not -_INT64 <= number < _INT64):
        raise ValueError
    return number


def _kind(base: type) -> str:
    """What a field expects, as the error message says it (including the range rules)."""
    return {int: "int (64-bit)", float: "float (finite)", str: "str", bool: "bool (true/false)",
            list: "list of ints (such as 1,5,10)"}.get(base, getattr(base, "__name__", str(base)))


def _quote(value: Any) -> str:
    """repr() keeps the message on one line whatever the value holds; long values are cut."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def apply_mapping(cfg: Config, mapping: dict, where: str) -> None:
    """Set fields from a flat or sectioned mapping; unknown keys are errors."""
    check_aliases([k for k in mapping if k not in SECTIONS]
                  + [k for s in SECTIONS if isinstance(mapping.get(s), dict) for k in mapping[s]], where)
    for key, value in mapping.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: section {_quote(key)} must be a mapping of its keys, got {_quote(value)}")
            for sub_key, sub_value in value.items():
                if key not in (LEAVES.get(sub_key, (None,))[0], FORMER_SECTIONS.get(sub_key)):
                    raise ConfigError(f"{where}: unknown key {_quote(f'{key}.{sub_key}')}")
                set_leaf(cfg, sub_key, sub_value, where)
        elif key in LEAVES:
            set_leaf(cfg, key, value, where)
        else:
            raise ConfigError(f"{where}: unknown key {_quote(key)}")


def set_leaf(cfg: Config, name: str, value: Any, where: str = "config") -> None:
    section, _, typ = LEAVES[name]
    value = coerce(name, value, typ, where)
    if name in ALIASES:
        name, value = ALIASES[name][0], ALIASES[name][1][value]
    setattr(getattr(cfg, section), name, value)


def check_aliases(names: Any, where: str) -> None:
    """One source of settings (a mapping, the flags) may give a leaf or its alias, not both."""
    for alias, (leaf, _) in ALIASES.items():
        if alias in names and leaf in names:
            raise ConfigError(f"{where}: '{alias}' is an alias of '{leaf}'; give one of them")


def preset_names() -> list[str]:
    """The named recipes shipped in seqrec/presets/: every NAME.yaml but the demo's."""
    return sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir()
                  if p.name.endswith(".yaml") and p.name != DEMO_PRESET.name)


def apply_preset(cfg: Config, name: str) -> Config:
    """Set the values of the packaged recipe `name` on cfg (for ``--preset`` and the Python API's
    ``preset=``) and return cfg. A recipe sets the model and its training, never the data or the
    run directory, so apply it first and the caller's own values after."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {_quote(name)}; available: {', '.join(names)}")
    apply_mapping(cfg, load_yaml(PRESETS / f"{name}.yaml"), f"preset {name}")
    return cfg


def load_yaml(path: str | Path | importlib.resources.abc.Traversable) -> dict:
    try:
        raw = (path if hasattr(path, "read_bytes") else Path(path)).read_bytes()  # a file or a package resource
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    binary = ConfigError(f"{path}: not a YAML config (binary data or not UTF-8 text)")
    if b"\x00" in raw:
        raise binary
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise binary from None
    try:
        data = yaml.safe_load(text) or {}
    # ValueError: a date such as 2020-13-45; RecursionError: nesting deeper than Python's stack.
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{path}: invalid YAML ({reason[:100]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return data


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (YAML- and weights_only-checkpoint-safe)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict, where: str = "checkpoint") -> Config:
    cfg = Config()
    apply_mapping(cfg, data, where)
    return cfg


def validate(cfg: Config) -> Config:
    """Reject values that would fail later, deep inside training, with a worse message: each
    section's fields (Section.validate), then how they combine. Returns cfg."""
    for name in SECTIONS:
        getattr(cfg, name).validate()
    check_combinations(cfg)
    return cfg


def check_combinations(cfg: Config) -> None:
    """The rules that tie one setting to another: one needs, excludes or names another. Kept
    in one pass, apart from the single-field rules, as the list of what goes with what."""
    d, m, t, r, e = cfg.data, cfg.model, cfg.train, cfg.run, cfg.eval
    if d.dataset and d.data_path:
        raise ConfigError("give --dataset or --data_path, not both")
    if m.hidden_units % m.num_heads:
        raise ConfigError(f"hidden_units ({m.hidden_units}) must be divisible by num_heads ({m.num_heads})")
    if t.loss == "ce" and t.shared_negatives:
        raise ConfigError("shared_negatives needs a sampled loss (bce, gbce or sampled_softmax), not ce")
    if t.logq and t.loss != "sampled_softmax":
        raise ConfigError(f"logq corrects sampled_softmax logits; it does not apply to loss '{t.loss}'")
    if e.select_metric not in metric_names(e):
        raise ConfigError(f"select_metric must be a metric the evaluation reports: sampled/HR@10, sampled/NDCG@10 "
                          f"or full/Recall|NDCG|MRR@K with K in topk {e.topk}; got {_quote(e.select_metric)}")
    if r.inference_only and not r.state_dict_path:
        raise ConfigError("--inference_only needs --state_dict_path")
    if r.resume and r.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other")


def metric_names(e: EvalConfig) -> list[str]:
    """Every metric evaluate() reports, hence every valid select_metric: the sampled protocol's
    HR and NDCG at 10 (the papers' cut-off) and the full ranking's at each K of topk."""
    full = [f"full/{name}@{k}" for k in e.topk for name in ("Recall", "NDCG", "MRR")]
    return ["sampled/HR@10", "sampled/NDCG@10", *full]


def check_with_data(cfg: Config, num_items: int, where: str) -> None:
    """The checks that need the loaded data (`where` names it); run before any training.

    Each evaluated user has seen at least its target, so no user has more than
    num_items - 1 unseen items to draw sampled-protocol negatives from; asking for more
    only repeats candidates, and far more is only slow: 10**6 took 138 s in draw_negatives
    on a 60-user file before training began."""
    if cfg.eval.eval_negatives > num_items - 1:
        raise ConfigError(f"--eval_negatives {cfg.eval.eval_negatives} is more than the {num_items - 1} items a "
                          f"user of {where} ({num_items} items) can have left unseen; pass at most {num_items - 1}")


def build_parser(prog: str = "seqrec train") -> argparse.ArgumentParser:
    """Flags generated from the tree; every boolean has --x and --no_x."""
    parser = argparse.ArgumentParser(prog=prog, argument_default=argparse.SUPPRESS,
                                     description="Train and evaluate SASRec / TiSASRec sequential recommenders.")
    parser.add_argument("--config", help="YAML file of config keys (flat or by section); flags override it")
    parser.add_argument("--preset", metavar="NAME", help=f"packaged recipe to start from: {', '.join(preset_names())} "
                                                         "(seqrec/presets/NAME.yaml; --config and flags override it)")
    for section in dataclasses.fields(Config):
        group = parser.add_argument_group(section.name)
        for name, (sec, f, typ) in LEAVES.items():
            if sec != section.name:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f"{f.metadata['help']} [default: {default}]"
            if typ is bool:
                group.add_argument(f"--{name}", dest=name, action="store_const", const=True, help=help_text)
                group.add_argument(f"--no_{name}", dest=name, action="store_const", const=False,
                                   help=argparse.SUPPRESS)
            else:
                group.add_argument(f"--{name}", dest=name, metavar=name.upper(), help=help_text)
    compat = parser.add_argument_group("seed compatibility")
    compat.add_argument("--use_amp", dest="amp", action="store_const", const="auto",
                        help="accepted: --amp auto, the default (it only undoes an --amp from a config or preset)")
    compat.add_argument("--no_use_amp", dest="amp", action="store_const", const="off", help="accepted: --amp off")
    compat.add_argument("--local-rank", "--local_rank", dest="_local_rank",
                        help="passed by torch.distributed.launch; ignored (the environment's LOCAL_RANK is used)")
    return parser


def parse_config(argv: list[str] | None = None, prog: str = "seqrec train") -> Config:
    """The validated config of a command line: see `compose` for the precedence."""
    args = vars(build_parser(prog).parse_args(argv))
    args.pop("_local_rank", None)
    return validate(compose(args.pop("preset", None), args.pop("config", None), args))


def compose(preset: str | None, yaml_path: str | os.PathLike | None, options: dict[str, Any],
            where: str = "flags", demo: bool = True) -> Config:
    """defaults < preset < the demo data < the YAML file < options, not yet validated.

    `options` are leaves by name (the flags a command line gave, or keyword arguments);
    `where` names them in errors ("flags": each as --name). The demo preset applies only
    when `demo` and neither the file nor the options name the data, so a config naming its
    own data never trains on the demo by accident."""
    check_aliases(options.keys(), where)
    from_yaml = load_yaml(yaml_path) if yaml_path is not None else {}
    cfg = Config()
    if preset is not None:
        apply_preset(cfg, preset)
    if demo and not (names_data(from_yaml) or names_data(options)):
        apply_mapping(cfg, load_yaml(DEMO_PRESET), str(DEMO_PRESET))
    apply_mapping(cfg, from_yaml, str(yaml_path))
    for name, value in options.items():
        if name not in LEAVES:
            raise ConfigError(f"{where}: unknown key {_quote(name)}")
        set_leaf(cfg, name, value, f"--{name}" if where == "flags" else where)
    return cfg


def names_data(mapping: dict) -> bool:
    """Whether a config mapping (flat or by section) names the data: else the demo data is used."""
    flat = dict(mapping)
    flat.update(mapping.get("data", {}) if isinstance(mapping.get("data"), dict) else {})
    return bool(flat.get("dataset") or flat.get("data_path"))


def flag_table() -> str:
    """The README's flag table, generated from the tree (a test keeps the README in sync)."""
    rows = ["| flag | section | default | meaning |", "|---|---|---|---|"]
    for name, (section, f, typ) in LEAVES.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = f"`--{name}` / `--no_{name}`" if typ is bool else f"`--{name}`"
        rows.append(f"| {flag} | {section} | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(flag_table())
