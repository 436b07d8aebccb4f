"""Serving: top-k recommendations from a checkpoint, in the dataset's original ids.

A checkpoint carries the model config and the item-id mapping, so a trained model can
be served without the training data: ``Recommender.from_checkpoint(path).recommend(...)``.
``seqrec recommend`` does the same from the command line for users of a dataset file.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch

from . import checkpoint as ckpt
from .config import DEVICE, ConfigError, ModelConfig, from_dict, validate
from .evaluate import mask_items
from .models import build_model


def model_config(state: dict, path: str) -> ModelConfig:
    """A checkpoint's model config, validated like a command line's: a hand-made or damaged
    checkpoint is refused here with its path, not deep in build_model or the first forward."""
    config = state.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise ckpt.CheckpointError(f"{path}: checkpoint has no model config (config.model)")
    try:
        cfg = from_dict({"model": model}, "config")
    except ConfigError as err:  # names its key: "config: unknown key 'x'"
        raise ckpt.CheckpointError(f"{path}: {err}") from None
    try:
        return validate(cfg).model
    except ConfigError as err:
        raise ckpt.CheckpointError(f"{path}: config: {err}") from None


def load_weights(model: torch.nn.Module, state: dict, path: str, built_for: str) -> None:
    """Copy the checkpoint's weights into `model` (built for `built_for`, said in the message),
    or fail with one line naming the first mismatch torch reports."""
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise ckpt.CheckpointError(f"{path}: checkpoint has no model weights")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # torch's message: a title line, then one tab-indented line per problem
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or ["load_state_dict failed"]
        detail = lines[0] if len(lines[0]) <= 200 else lines[0][:200] + "..."
        raise ckpt.CheckpointError(f"{path}: weights do not fit {built_for} ({detail})") from None


class Recommender:
    def __init__(self, model: torch.nn.Module, maxlen: int, item_ids: list[str], uses_time: bool,
                 device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.maxlen, self.uses_time, self.device = maxlen, uses_time, torch.device(device)
        self.item_ids = list(item_ids)
        self.index = {item: i + 1 for i, item in enumerate(self.item_ids)}  # 0 is padding

    @classmethod
    def from_checkpoint(cls, path: str, device: torch.device | str = "cpu") -> Recommender:
        return cls.from_state(ckpt.load(path), path, device)

    @classmethod
    def from_state(cls, state: dict, path: str, device: torch.device | str = "cpu") -> Recommender:
        """The Recommender of a loaded checkpoint `state` (read from `path`, named in errors)."""
        item_ids = state.get("item_ids")
        if not isinstance(item_ids, (list, tuple)) or not item_ids:
            raise ckpt.CheckpointError(f"{path}: checkpoint has no item-id mapping (written by a benchmark?)")
        cfg = model_config(state, path)
        model = build_model(cfg, len(item_ids))
        load_weights(model, state, path, f"its model config and its {len(item_ids)} item ids")
        return cls(model, cfg.maxlen, [str(item) for item in item_ids], cfg.time, device)

    def _encode(self, histories: list[list[str]], times: list[list[int]] | None, strict: bool):
        """Left-padded [B, maxlen] item (and time) tensors of the known items of each history.

        A times row must pair every item with its timestamp: zip() would silently cut the
        longer of the two, dropping the history's newest items."""
        if times is not None:
            if len(times) != len(histories):
                raise ValueError(f"times has {len(times)} rows for {len(histories)} histories")
            for row, (history, stamps) in enumerate(zip(histories, times)):
                if len(stamps) != len(history):
                    raise ValueError(f"times row {row} has {len(stamps)} timestamps for the {len(history)} items "
                                     f"of history {row}")
        items = torch.zeros(len(histories), self.maxlen, dtype=torch.long)
        stamps = torch.zeros_like(items)
        for row, history in enumerate(histories):
            known = [(self.index[str(item)], t) for item, t in
                     zip(history, times[row] if times is not None else [0] * len(history))
                     if str(item) in self.index]
            if len(known) < len(history):
                message = f"history {row}: {len(history) - len(known)} unknown item id(s) dropped"
                if strict:
                    raise ValueError(message)
                warnings.warn(message, stacklevel=3)
            known = known[-self.maxlen:]
            if known:
                items[row, -len(known):] = torch.tensor([i for i, _ in known])
                stamps[row, -len(known):] = torch.tensor([t for _, t in known])
        batch = {"items": items.to(self.device)}
        if self.uses_time:
            batch["times"] = stamps.to(self.device)
        return batch

    @torch.no_grad()
    def recommend(self, histories: list[list[str]], k: int = 10, exclude_seen: bool = True,
                  times: list[list[int]] | None = None, strict: bool = False,
                  item_chunk: int = 65536) -> list[list[tuple[str, float]]]:
        """The k highest-scoring items (original id, score) after each history (oldest first).

        TiSASRec models need the histories' unix timestamps in ``times``, one row per history
        and one timestamp per item. Unknown item ids are dropped with a warning, or rejected
        when ``strict``. Items are scored `item_chunk` ids at a time, so memory is request
        batch x chunk at any catalogue size.
        """
        if self.uses_time and times is None:
            raise ValueError("this is a TiSASRec model: pass the histories' timestamps as times=")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if item_chunk < 1:
            raise ValueError(f"item_chunk must be at least 1, got {item_chunk}")
        batch = self._encode(histories, times, strict)
        values, indices = self._top_k(self.model(batch)[:, -1], batch["items"] if exclude_seen else None,
                                      min(k, len(self.item_ids)), item_chunk)
        return [[(self.item_ids[i - 1], s) for i, s in zip(idx.tolist(), val.tolist()) if s != float("-inf")]
                for idx, val in zip(indices, values)]

    def _top_k(self, hidden: torch.Tensor, seen: torch.Tensor | None, k: int,
               chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k scores and item ids over the catalogue, merged chunk by chunk: each chunk's own
        top k joins the running top k, so only [B, chunk] scores exist at a time. Padding
        (id 0) and the `seen` ids [B, L] (0 = none) score -inf."""
        width = len(self.item_ids) + 1
        pairs = None  # (row, item id) of every seen item, found once for all chunks
        if seen is not None:
            rows, slots = seen.nonzero(as_tuple=True)  # 0 is padding, not an item
            pairs = rows, seen[rows, slots]
        values = hidden.new_empty(len(hidden), 0, dtype=torch.float32)
        indices = torch.empty(len(hidden), 0, dtype=torch.long, device=hidden.device)
        for start in range(0, width, chunk):
            scores = self.model.score_all(hidden, slice(start, min(start + chunk, width))).float()
            if start == 0:
                scores[:, 0] = float("-inf")
            if pairs is not None:
                mask_items(scores, *pairs, start)
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            values, indices = torch.cat([values, top.values], 1), torch.cat([indices, top.indices + start], 1)
            keep = values.topk(min(k, values.shape[1]), dim=1)
            values, indices = keep.values, indices.gather(1, keep.indices)
        return values, indices


def main(argv: list[str] | None = None) -> int:
    """`seqrec recommend --checkpoint CKPT --data_path FILE --user ID [-k 10]`: users' histories from FILE."""
    parser = argparse.ArgumentParser(prog="seqrec recommend", description=main.__doc__)
    parser.add_argument("--checkpoint", required=True, help="best.pt or latest.pt of a run")
    parser.add_argument("--data_path", help="interactions file holding the users' histories "
                                            "(default: the checkpoint's training data)")
    parser.add_argument("--user", action="append", default=[], help="user id (repeatable)")
    parser.add_argument("--users_file", help="file with one user id per line")
    parser.add_argument("-k", type=int, default=10, help="recommendations per user")
    parser.add_argument("--include_seen", action="store_true", help="allow items already in the history")
    parser.add_argument("--item_chunk", type=int, default=65536,
                        help="item ids scored at a time (memory: users x chunk scores)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    from .data import DataError, load_sequences, resolve_path
    try:
        for flag, value in (("-k", args.k), ("--item_chunk", args.item_chunk)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        check_device(args.device)
        state = ckpt.load(args.checkpoint)
        rec = Recommender.from_state(state, args.checkpoint, args.device)
        data_cfg = from_dict({"data": state["config"].get("data") or {}}, f"{args.checkpoint}: config").data
        if args.data_path:
            data_cfg.data_path, data_cfg.dataset = args.data_path, None
        users = list(args.user)
        if args.users_file:
            users += read_user_ids(args.users_file)
        if not users:
            raise ConfigError("give --user ID or --users_file FILE")
        seqs = load_sequences(data_cfg)
        if rec.uses_time and seqs.times is None:
            raise DataError(f"{resolve_path(data_cfg)}: this TiSASRec model needs timestamps and the file has none")
        row_of = {u: i for i, u in enumerate(seqs.user_ids)}
        missing = [u for u in users if u not in row_of]
        if missing:
            raise ConfigError(f"user(s) not in the data: {', '.join(missing[:5])}")
        spans = [slice(seqs.offsets[row_of[u]], seqs.offsets[row_of[u] + 1]) for u in users]
        histories = [[seqs.item_ids[i - 1] for i in seqs.items[s]] for s in spans]
        times = [seqs.times[s].tolist() for s in spans] if rec.uses_time else None
        for user, recs in zip(users, rec.recommend(histories, args.k, not args.include_seen, times,
                                                     item_chunk=args.item_chunk)):
            print(f"{user}\t" + " ".join(f"{item}:{score:.3f}" for item, score in recs))
    except (ConfigError, DataError, ckpt.CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def read_user_ids(path: str) -> list[str]:
    """The non-blank lines of a users file, or ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as err:
        raise ConfigError(f"{path}: cannot read user ids ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read user ids (not UTF-8 text)") from None


def check_device(device: str) -> None:
    """A device this machine has: the string a config allows, and CUDA only where it is
    available (else torch fails in the model's .to(), which reads as a broken checkpoint)."""
    if not DEVICE.fullmatch(device):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
