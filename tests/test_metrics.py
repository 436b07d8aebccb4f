import math

import pytest
import torch

from seqrec.config import EvalConfig, metric_names
from seqrec.data.tensors import EvalSplit
from seqrec.evaluate import eval_batch_size, evaluate
from seqrec.metrics import metric_sums, pessimistic_rank


def test_pessimistic_rank_counts_ties_above_target():
    target = torch.tensor([0.5, 0.5, 0.5])
    others = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.1, 0.9], [0.5, 0.5, 0.5]])
    assert pessimistic_rank(target, others).tolist() == [0, 2, 3]


def test_metric_sums_by_hand():
    ranks = torch.tensor([0, 1, 4, 12])
    s = metric_sums(ranks, [1, 5, 10])
    assert s["Recall@1"].item() == 1
    assert s["Recall@5"].item() == 3
    assert s["Recall@10"].item() == 3
    assert s["NDCG@5"].item() == pytest.approx(1 + 1 / math.log2(3) + 1 / math.log2(6))
    assert s["MRR@10"].item() == pytest.approx(1 + 1 / 2 + 1 / 5)
    assert s["NDCG@1"].dtype == torch.float64


class FixedScores(torch.nn.Module):
    """A 'model' whose scores for every user are a fixed table row (hidden = row index)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def forward(self, batch):
        rows = batch["users"].float()
        return rows[:, None, None].expand(-1, batch["items"].shape[1], 1)

    def score(self, hidden, items):
        return self.table[hidden[:, 0, 0].long()].gather(1, items)

    def score_all(self, hidden, items=slice(None)):
        return self.table[hidden[:, 0].long()][:, items]


def make_split(targets, negatives, history_items):
    users = torch.arange(len(targets))
    keys = sorted(u * 6 + i for u, items in enumerate(history_items) for i in items)
    return EvalSplit(users=users, items=torch.ones(len(targets), 3, dtype=torch.long), times=None,
                     targets=torch.tensor(targets), negatives=torch.tensor(negatives),
                     history=torch.tensor(keys, dtype=torch.long))


def test_sampled_hit_rate_cuts_at_ten():
    """12 sampled negatives: user 0 has 10 above its target (rank 10: a miss), user 1 has 8
    above and 1 tied (pessimistic rank 9: a hit at the last slot)."""
    targets, negatives = [1, 1], [list(range(2, 14))] * 2
    table = [[0.0, 0.0] + [1.0] * 10 + [-1.0] * 2,
             [0.0, 0.0] + [1.0] * 8 + [0.0] + [-1.0] * 3]
    split = make_split(targets, negatives, history_items=[[], []])
    m = evaluate(FixedScores(table), split, EvalConfig(), num_items=13, protocols=("sampled",))
    assert m["sampled/HR@10"] == pytest.approx(0.5)
    assert m["sampled/NDCG@10"] == pytest.approx(1 / math.log2(11) / 2)


def test_every_selectable_metric_is_computed():
    """evaluate() reports every name of config.metric_names (the --select_metric choices), and a
    name it did not compute would read 0: a model ranking each target first scores 1 on all."""
    table = [[0.0, 0.1, 0.9, 0.3, 0.2, 0.0], [0.0, 0.8, 0.1, 0.95, 0.5, 0.7]]
    split = make_split(targets=[2, 3], negatives=[[1, 3], [2, 5]], history_items=[[], []])
    cfg = EvalConfig(topk=[3, 7])
    m = evaluate(FixedScores(table), split, cfg, num_items=5)
    assert sorted(m) == sorted(metric_names(cfg)) and set(m.values()) == {1.0}


@pytest.mark.parametrize("chunk", [65536, 4, 2])  # one chunk; ids 0-3 + 4-5; three chunks of 2
def test_evaluate_both_protocols_by_hand(chunk):
    # 5 items (ids 1..5, column 0 = padding). User 0: target 2 ranks first among all.
    # User 1: target 3 has items 1 and 5 above it and item 4 tied -> pessimistic full rank 3.
    table = [[9.0, 0.1, 0.9, 0.3, 0.2, 0.0],
             [9.0, 0.8, 0.1, 0.5, 0.5, 0.7]]
    split = make_split(targets=[2, 3], negatives=[[1, 3], [2, 5]], history_items=[[1], [1, 5]])
    cfg = EvalConfig(topk=[1, 5], eval_batch_size=1, eval_item_chunk=chunk)
    m = evaluate(FixedScores(table), split, cfg, num_items=5)
    # sampled: user 0 rank 0, user 1 rank 1 (item 5 above, item 2 below); HR@10's cut-off: below
    assert m["sampled/NDCG@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    # full: padding column (score 9) must be ignored; ranks 0 and 3
    assert m["full/Recall@1"] == pytest.approx(0.5)
    assert m["full/NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 2)
    assert m["full/MRR@5"] == pytest.approx((1 + 1 / 4) / 2)
    # history masking removes items 1 and 5 for user 1 -> rank 1 (only the tie with item 4 remains)
    masked = evaluate(FixedScores(table), split, EvalConfig(topk=[1, 5], mask_history=True, eval_item_chunk=chunk),
                      num_items=5)
    assert masked["full/MRR@5"] == pytest.approx((1 + 1 / 2) / 2)


@pytest.mark.parametrize("chunk", [65536, 2])
def test_history_masking_never_masks_the_target(chunk):
    table = [[0.0, 0.9, 0.1, 0.2, 0.3, 0.4]]
    split = make_split(targets=[1], negatives=[[2, 3]], history_items=[[1, 2]])  # repeat consumption of item 1
    m = evaluate(FixedScores(table), split, EvalConfig(topk=[1], mask_history=True, eval_item_chunk=chunk),
                 num_items=5)
    assert m["full/Recall@1"] == 1.0


@pytest.mark.parametrize("time", [False, True])
def test_evaluation_of_trimmed_batches_equals_full_width(data_file, time):
    """evaluate() visits users by length and drops all-padding columns; a plain full-width
    pass over the users in file order must give the same metrics."""
    from conftest import small_config
    from seqrec.data import load_sequences
    from seqrec.data.tensors import SequenceTensors
    from seqrec.models import build_model
    cfg = small_config(data_file, data_file.parent, model__time=time, eval__eval_batch_size=7)
    data = SequenceTensors(load_sequences(cfg.data), cfg.model.maxlen, "cpu", eval_negatives=20)
    model = build_model(cfg.model, data.num_items).eval()
    split = data.splits["valid"]
    assert ((split.items != 0).sum(1) < cfg.model.maxlen).sum() >= 7  # at least one whole batch is trimmed
    with torch.no_grad():
        batch = split.batch(slice(None))
        hidden = model(batch)[:, -1]
        scores = model.score(hidden[:, None, :], torch.cat([batch["targets"][:, None], batch["negatives"]], 1))
        full = model.score_all(hidden)
    sampled = metric_sums(pessimistic_rank(scores[:, 0], scores[:, 1:]), [10], ("HR", "NDCG"))
    target = full.gather(1, batch["targets"][:, None])[:, 0]
    full[:, 0] = -math.inf
    full.scatter_(1, batch["targets"][:, None], -math.inf)
    ranked = metric_sums(pessimistic_rank(target, full), cfg.eval.topk)
    m = evaluate(model, split, cfg.eval, data.num_items)
    assert m["sampled/NDCG@10"] == pytest.approx(sampled["NDCG@10"].item() / len(split), abs=1e-6)
    assert m["full/NDCG@10"] == pytest.approx(ranked["NDCG@10"].item() / len(split), abs=1e-6)
    assert m["full/MRR@20"] == pytest.approx(ranked["MRR@20"].item() / len(split), abs=1e-6)


@pytest.mark.parametrize("mask_history", [False, True])
def test_chunked_full_ranking_equals_one_product(data_file, mask_history):
    """Scoring the catalogue 7 ids at a time (two passes) gives the metrics of one product."""
    from conftest import small_config
    from seqrec.data import load_sequences
    from seqrec.data.tensors import SequenceTensors
    from seqrec.models import build_model
    cfg = small_config(data_file, data_file.parent, eval__mask_history=mask_history)
    data = SequenceTensors(load_sequences(cfg.data), cfg.model.maxlen, "cpu", eval_negatives=20)
    model = build_model(cfg.model, data.num_items).eval()
    whole = evaluate(model, data.splits["test"], cfg.eval, data.num_items, ("full",))
    cfg.eval.eval_item_chunk = 7
    assert data.num_items + 1 > 2 * 7
    assert evaluate(model, data.splits["test"], cfg.eval, data.num_items, ("full",)) == whole


def test_evaluation_batch_default_depends_on_the_device():
    """0 picks 512 users on a GPU and 64 on CPU (docs/PERFORMANCE.md § Host memory); a set value wins."""
    assert eval_batch_size(EvalConfig(), torch.device("cpu")) == 64
    assert eval_batch_size(EvalConfig(), torch.device("cuda")) == 512
    assert eval_batch_size(EvalConfig(eval_batch_size=7), torch.device("cpu")) == 7
