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
from .config import ConfigError, from_dict
from .evaluate import mask_items
from .models import build_model


class Recommender:
    def __init__(self, model: torch.nn.Module, maxlen: int, item_ids: list[str], uses_time: bool,
                 device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.maxlen, self.uses_time, self.device = maxlen, uses_time, torch.device(device)
        self.item_ids = list(item_ids)
        self.index = {item: i + 1 for i, item in enumerate(self.item_ids)}  # 0 is padding

    @classmethod
    def from_checkpoint(cls, path: str, device: torch.device | str = "cpu") -> Recommender:
        state = ckpt.load(path)
        if not state.get("item_ids"):
            raise ckpt.CheckpointError(f"{path}: checkpoint has no item-id mapping (written by a benchmark?)")
        cfg = from_dict({"model": state["config"]["model"]}).model
        model = build_model(cfg, len(state["item_ids"]))
        model.load_state_dict(state["model"])
        return cls(model, cfg.maxlen, state["item_ids"], cfg.time, device)

    def _encode(self, histories: list[list[str]], times: list[list[int]] | None, strict: bool):
        """Left-padded [B, maxlen] item (and time) tensors of the known items of each history."""
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

        TiSASRec models need the histories' unix timestamps in ``times``. Unknown item ids
        are dropped with a warning, or rejected when ``strict``. Items are scored
        `item_chunk` ids at a time, so memory is request batch x chunk at any catalogue size.
        """
        if self.uses_time and times is None:
            raise ValueError("this is a TiSASRec model: pass the histories' timestamps as times=")
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
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.item_chunk < 1:
        parser.error("--item_chunk must be at least 1")
    from .data import DataError, load_sequences
    try:
        rec = Recommender.from_checkpoint(args.checkpoint, args.device)
        data_cfg = from_dict(ckpt.load(args.checkpoint)["config"]).data
        if args.data_path:
            data_cfg.data_path, data_cfg.dataset = args.data_path, None
        users = list(args.user)
        if args.users_file:
            users += [line.strip() for line in open(args.users_file) if line.strip()]
        if not users:
            raise ConfigError("give --user ID or --users_file FILE")
        seqs = load_sequences(data_cfg)
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
