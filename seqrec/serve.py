"""Serving: top-k recommendations from a trained run, in the dataset's original ids.

A checkpoint carries the model config and the item-id mapping, and its run directory the
users' sequences (``sequences.npz``, written when training starts), so a trained model
serves known users and new histories without the training data:
``Recommender.from_checkpoint(run_dir).recommend(["1", "7"])``. ``seqrec recommend``
(seqrec/recommend.py) does the same from the command line, for a few users or all of them.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import ConfigError, DataConfig, ModelConfig, from_dict, validate
from .data import sequences
from .data.sequences import Sequences
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


def _is_histories(users) -> bool:
    """Whether `recommend` was called the old way, with histories (lists of item ids)."""
    first = next(iter(users), None) if not isinstance(users, (str, bytes)) else None
    return isinstance(first, (list, tuple, np.ndarray))


class Recommender:
    """A trained model ready to serve: top-k items for known users or for new histories, and
    the items most like given ones, in the dataset's original ids.

    Ids are matched as ``str(value)``: ``recommend(["1"])`` and ``recommend([1])`` find the
    same integer user 1, and returned item ids are strings. Results are two arrays of shape
    (len(users), k): item ids (object dtype) and float32 scores, best first; a row with fewer
    than k eligible items ends in ids None and scores -inf.
    """

    def __init__(self, model: torch.nn.Module, maxlen: int, item_ids: list[str], uses_time: bool,
                 device: torch.device | str = "cpu", users: Sequences | None = None, config: dict | None = None):
        self.model = model.to(device).eval()
        self.maxlen, self.uses_time, self.device = maxlen, uses_time, torch.device(device)
        self.item_ids = list(item_ids)
        self.index = {item: i + 1 for i, item in enumerate(self.item_ids)}  # 0 is padding
        self.users = users  # the run's known users and their whole histories (sequences.npz)
        self.config = config  # the run's stored config (evaluate reads its eval settings)
        self._ids = np.array([None, *self.item_ids], dtype=object)  # index -> id, padding -> None
        self._user_row: dict[str, int] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu") -> Recommender:
        """The model of a run directory (its best.pt) or a checkpoint file, with the run's known
        users when its directory holds them."""
        path = ckpt.resolve(path)
        return cls.from_state(ckpt.load(path), str(path), device, known_users(path))

    @classmethod
    def from_state(cls, state: dict, path: str, device: torch.device | str = "cpu",
                   users: Sequences | None = None) -> Recommender:
        """The Recommender of a loaded checkpoint `state` (read from `path`, named in errors)."""
        item_ids = state.get("item_ids")
        if not isinstance(item_ids, (list, tuple)) or not item_ids:
            raise ckpt.CheckpointError(f"{path}: checkpoint has no item-id mapping (written by a benchmark?)")
        cfg = model_config(state, path)
        model = build_model(cfg, len(item_ids))
        load_weights(model, state, path, f"its model config and its {len(item_ids)} item ids")
        item_ids = [str(item) for item in item_ids]
        if users is not None and [str(i) for i in users.item_ids] != item_ids:
            warnings.warn(f"{path}: the run directory's {sequences.FILE} belongs to other items; "
                          f"known users are not available", stacklevel=3)
            users = None
        return cls(model, cfg.maxlen, item_ids, cfg.time, device, users, state.get("config"))

    # ---------------------------------------------------------------- requests
    def recommend(self, users, k: int = 10, *args, exclude_seen: bool = True, exclude_items=None,
                  allow_items=None, item_chunk: int = 65536, eligible: torch.Tensor | None = None, **legacy):
        """Top-k items for known users (ids as in the training data), after their whole history.

        ``exclude_seen`` removes every item of the user's history, not only the last maxlen;
        ``exclude_items`` / ``allow_items`` (item ids; unknown ones are ignored) are applied
        inside the top-k, so each row still holds k eligible items; a caller asking many times
        with the same filters builds them once, ``eligible=rec.eligible(exclude, allow)``.
        Unknown users raise KeyError naming them. Passing histories (lists of item ids) is the old form of
        `recommend_histories`, kept for one release with a DeprecationWarning.
        """
        if _is_histories(users):
            warnings.warn("Recommender.recommend(histories) is deprecated: use recommend_histories(histories), "
                          "which returns (ids, scores) arrays", DeprecationWarning, stacklevel=2)
            return self._legacy(users, k, *args, item_chunk=item_chunk, **legacy)
        if args or legacy:
            raise TypeError(f"recommend() got unexpected arguments {args or ''}{list(legacy) or ''}")
        if eligible is None:
            eligible = self.eligible(exclude_items, allow_items)
        elif exclude_items is not None or allow_items is not None:
            raise ValueError("give eligible= or exclude_items / allow_items, not both")
        rows = self.user_rows(users)
        batch, seen = self._known_inputs(rows, exclude_seen)
        return self._rank(batch, seen, k, eligible, item_chunk)

    def recommend_histories(self, histories: Sequence[Sequence], k: int = 10, times: Sequence[Sequence] | None = None,
                            exclude_seen: bool = True, exclude_items=None, allow_items=None, strict: bool = False,
                            item_chunk: int = 65536):
        """Top-k items after each history (item ids, oldest first), for users the run never saw.

        TiSASRec models need the histories' unix timestamps in ``times``, one row per history
        and one timestamp per item. Unknown item ids are dropped with a warning, or rejected
        when ``strict``; the last maxlen known items are the model input and, with
        ``exclude_seen``, every known item of the history is excluded.
        """
        if self.uses_time and times is None:
            raise ValueError("this is a TiSASRec model: pass the histories' timestamps as times=")
        known = self._map_histories(histories, times, strict)
        batch = self._window(known)
        seen = None
        if exclude_seen:
            seen = (np.repeat(np.arange(len(known)), [len(h) for h, _ in known]),
                    np.fromiter((i for h, _ in known for i in h), dtype=np.int64))
        return self._rank(batch, seen, k, self.eligible(exclude_items, allow_items), item_chunk)

    @torch.no_grad()
    def similar_items(self, items: Sequence, k: int = 10, item_chunk: int = 65536):
        """The k items whose embeddings have the highest cosine similarity to each given item
        (the item itself excluded); unknown item ids raise KeyError naming them."""
        missing = [str(i) for i in items if str(i) not in self.index]
        if missing:
            raise KeyError(f"item(s) not in the catalogue: {', '.join(missing[:5])}")
        query = torch.tensor([self.index[str(i)] for i in items], dtype=torch.long, device=self.device)
        weight = self.model.item_vectors().float()
        unit = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        seen = (np.arange(len(query)), query.cpu().numpy())
        return self._top_k(unit[query], lambda h, chunk: h @ unit[chunk].t(), seen, k, None, item_chunk)

    # ---------------------------------------------------------------- known users
    def user_rows(self, users) -> np.ndarray:
        """Rows of `users` (ids matched as str) in the run's sequences; KeyError names unknown ones."""
        if self.users is None:
            raise KeyError(f"no known users: the run directory has no {sequences.FILE} "
                           f"(use recommend_histories, or seqrec recommend --data_path)")
        if self._user_row is None:
            self._user_row = {str(u): r for r, u in enumerate(self.users.user_ids)}
        users = [str(u) for u in users]
        missing = [u for u in users if u not in self._user_row]
        if missing:
            raise KeyError(f"user(s) not in the training data: {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        return np.array([self._user_row[u] for u in users], dtype=np.int64)

    def _known_inputs(self, rows: np.ndarray, exclude_seen: bool):
        """The model input (last maxlen items and times) of known users' rows, and their
        whole histories as (row, item) pairs when seen items are excluded."""
        seqs = self.users
        items, times = seqs.window(rows, seqs.offsets[rows + 1], self.maxlen)
        batch = {"items": torch.as_tensor(items, device=self.device)}
        if self.uses_time:
            batch["times"] = torch.as_tensor(times, device=self.device)
        if not exclude_seen:
            return batch, None
        lengths = seqs.lengths[rows]
        starts = np.repeat(seqs.offsets[rows] - np.cumsum(lengths) + lengths, lengths)
        flat = starts + np.arange(lengths.sum())
        return batch, (np.repeat(np.arange(len(rows)), lengths), seqs.items[flat])

    # ---------------------------------------------------------------- new histories
    def _map_histories(self, histories, times, strict: bool) -> list[tuple[list[int], list[int]]]:
        """Each history's known item indices and their timestamps.

        A times row must pair every item with its timestamp: zip() would silently cut the
        longer of the two, dropping the history's newest items."""
        if times is not None:
            if len(times) != len(histories):
                raise ValueError(f"times has {len(times)} rows for {len(histories)} histories")
            for row, (history, stamps) in enumerate(zip(histories, times)):
                if len(stamps) != len(history):
                    raise ValueError(f"times row {row} has {len(stamps)} timestamps for the {len(history)} items "
                                     f"of history {row}")
        out = []
        for row, history in enumerate(histories):
            stamps = times[row] if times is not None else [0] * len(history)
            known = [(self.index[str(item)], int(t)) for item, t in zip(history, stamps) if str(item) in self.index]
            if len(known) < len(history):
                message = f"history {row}: {len(history) - len(known)} unknown item id(s) dropped"
                if strict:
                    raise ValueError(message)
                warnings.warn(message, stacklevel=4)
            out.append(([i for i, _ in known], [t for _, t in known]))
        return out

    def _window(self, known: list[tuple[list[int], list[int]]]) -> dict:
        """Left-padded [B, maxlen] item (and time) tensors of the last maxlen known items."""
        items = torch.zeros(len(known), self.maxlen, dtype=torch.long)
        stamps = torch.zeros_like(items)
        for row, (history, times) in enumerate(known):
            history, times = history[-self.maxlen:], times[-self.maxlen:]
            if history:
                items[row, -len(history):] = torch.tensor(history)
                stamps[row, -len(history):] = torch.tensor(times)
        batch = {"items": items.to(self.device)}
        if self.uses_time:
            batch["times"] = stamps.to(self.device)
        return batch

    def _legacy(self, histories, k: int = 10, exclude_seen: bool = True, times=None, strict: bool = False,
                item_chunk: int = 65536) -> list[list[tuple[str, float]]]:
        """The old recommend(histories): per history, a list of (item id, score)."""
        ids, scores = self.recommend_histories(histories, k, times, exclude_seen, strict=strict, item_chunk=item_chunk)
        return [[(i, float(s)) for i, s in zip(row_ids, row_scores) if i is not None]
                for row_ids, row_scores in zip(ids, scores)]

    # ---------------------------------------------------------------- ranking
    @torch.no_grad()
    def _rank(self, batch: dict, seen, k: int, eligible: torch.Tensor | None, item_chunk: int):
        hidden = self.model(batch)[:, -1]
        return self._top_k(hidden, lambda h, chunk: self.model.score_all(h, chunk), seen, k, eligible, item_chunk)

    def eligible(self, exclude_items=None, allow_items=None) -> torch.Tensor | None:
        """[num_items + 1] bool on the model's device: which items may be recommended, from item
        ids to leave out and/or the only ids to allow (unknown ids ignored); None: all of them."""
        if exclude_items is None and allow_items is None:
            return None
        eligible = torch.zeros(len(self.item_ids) + 1, dtype=torch.bool) if allow_items is not None else \
            torch.ones(len(self.item_ids) + 1, dtype=torch.bool)
        if allow_items is not None:
            eligible[[self.index[str(i)] for i in allow_items if str(i) in self.index]] = True
        if exclude_items is not None:
            eligible[[self.index[str(i)] for i in exclude_items if str(i) in self.index]] = False
        return eligible.to(self.device)

    def _top_k(self, hidden: torch.Tensor, scorer, seen, k: int, eligible: torch.Tensor | None, chunk: int):
        """Top-k (ids, scores) over the catalogue, merged chunk by chunk: each chunk's own top k
        joins the running top k, so only [B, chunk] scores exist at a time. Padding (id 0),
        the `seen` (row, item index) pairs and items not `eligible` score -inf."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if chunk < 1:
            raise ValueError(f"item_chunk must be at least 1, got {chunk}")
        k, width = min(k, len(self.item_ids)), len(self.item_ids) + 1
        pairs = None if seen is None else tuple(torch.as_tensor(a, dtype=torch.long, device=hidden.device)
                                                for a in seen)
        values = hidden.new_empty(len(hidden), 0, dtype=torch.float32)
        indices = torch.empty(len(hidden), 0, dtype=torch.long, device=hidden.device)
        for start in range(0, width, chunk):
            part = slice(start, min(start + chunk, width))
            scores = scorer(hidden, part).float()
            if start == 0:
                scores[:, 0] = float("-inf")
            if eligible is not None:
                scores.masked_fill_(~eligible[part], float("-inf"))
            if pairs is not None:
                mask_items(scores, *pairs, start)
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            values, indices = torch.cat([values, top.values], 1), torch.cat([indices, top.indices + start], 1)
            keep = values.topk(min(k, values.shape[1]), dim=1)
            values, indices = keep.values, indices.gather(1, keep.indices)
        values, indices = values.cpu().numpy(), indices.cpu().numpy()
        ids = self._ids[np.where(np.isneginf(values), 0, indices)]
        return ids, values.astype(np.float32)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, data=None, splits: tuple[str, ...] = ("valid", "test")) -> dict:
        """The run's validation and test metrics under both protocols, with its evaluation
        settings: on the data it was trained on (the run directory's sequences), or on `data`
        (anything `seqrec.fit` takes, with the same items)."""
        from .data import SequenceTensors
        from .evaluate import evaluate
        if self.config is None:
            raise ValueError("this model carries no run config to evaluate with (made by hand?)")
        cfg = from_dict(self.config)
        seqs = self.users if data is None else sequences_of(data, cfg.data)[0]
        if seqs is None:
            raise ValueError(f"the run directory has no {sequences.FILE}: pass the training data, evaluate(data)")
        if [str(i) for i in seqs.item_ids] != self.item_ids:
            raise ValueError(f"the data's {seqs.num_items:,} items are not the model's {len(self.item_ids):,}; "
                             f"was it trained on other data?")
        tensors = SequenceTensors(seqs, self.maxlen, self.device, cfg.eval.eval_negatives, cfg.eval.eval_seed)
        return {split: evaluate(self.model, tensors.splits[split], cfg.eval, tensors.num_items) for split in splits}


def known_users(checkpoint: Path) -> Sequences | None:
    """The sequences beside a checkpoint in its run directory, when it holds them."""
    path = checkpoint.parent / sequences.FILE
    return Sequences.load(path) if path.is_file() else None


def sequences_of(data, d: DataConfig) -> tuple[Sequences, str]:
    """(sequences, a name for messages) of `data` in any form `seqrec.fit` takes, read with
    the run's column names and filtered with its count thresholds."""
    from .data import build_sequences
    from .data.frames import interactions_from
    interactions = interactions_from(data, user_col=d.user_col, item_col=d.item_col, time_col=d.time_col)
    return build_sequences(interactions, d.min_user_count, d.min_item_count), interactions.path
