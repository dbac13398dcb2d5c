"""Expert-load-aware placement: a skewed recorded load gets a lower max/mean rank load, every expert
is placed, and the load is read from what the engine and the server record.

That serving with a balanced placement leaves the output unchanged is checked on 2 ranks in
test_infer_parallel.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from dsv32.cli import main
from dsv32.infer import Engine, SamplingParams
from dsv32.infer.eplb import (balanced_placement, contiguous_placement, imbalance, placement_report,
                              rank_loads, read_expert_load)
from dsv32.serve.metrics import Metrics

from infer_common import nano_model, prompts_for, single_thread  # noqa: F401  (fixture)


def skewed_load(layers: int = 3, experts: int = 16, seed: int = 0) -> torch.Tensor:
    """Zipf-like: a few hot experts, shuffled differently per layer, hot ones clustered on rank 0 in layer 0."""
    g = torch.Generator().manual_seed(seed)
    base = 1000.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
    rows = [base] + [base[torch.randperm(experts, generator=g)] for _ in range(layers - 1)]
    return torch.stack(rows).round()


@pytest.mark.parametrize("ranks,redundant", [(4, 0), (4, 4), (2, 2), (8, 8)])
def test_balanced_placement_lowers_max_over_mean(ranks, redundant):
    load = skewed_load()
    layers, experts = load.shape
    before = imbalance(contiguous_placement(layers, experts, ranks), load)
    placement = balanced_placement(load, ranks, redundant)
    after = imbalance(placement, load)
    assert (after <= before).all() and after.mean() < before.mean()
    # shape, every expert somewhere, and the copies went to the hottest experts
    assert placement.slots.shape == (layers, ranks, (experts + redundant) // ranks)
    replicas = placement.replicas(experts)
    assert (replicas >= 1).all() and (replicas.sum(-1) == experts + redundant).all()
    if redundant:
        assert (replicas.gather(1, load.argmax(-1, keepdim=True)) > 1).all()
    # tokens are conserved: a replicated expert's load is split, not duplicated
    torch.testing.assert_close(rank_loads(placement, load).sum(-1), load.sum(-1))


def test_redundant_copies_beat_packing_alone_on_one_dominant_expert():
    load = torch.tensor([[1000.0] + [10.0] * 15])
    packed = imbalance(balanced_placement(load, 4, 0), load)
    copied = imbalance(balanced_placement(load, 4, 4), load)
    assert copied.item() < packed.item() / 1.5
    report = placement_report(load, balanced_placement(load, 4, 4), 4)
    assert "max/mean rank load" in report and "4 redundant" in report


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="do not split evenly"):
        balanced_placement(skewed_load(experts=16), 3, 0)
    with pytest.raises(ValueError, match="must be \\[moe_layers, experts\\]"):
        balanced_placement(torch.ones(16), 4, 0)


def test_load_is_read_from_engine_stats_and_the_metrics_page(tmp_path):
    model = nano_model()
    cfg = model.config
    engine = Engine(model, max_batch=2, max_seq_len=64)
    engine.complete(prompts_for(cfg, (9, 14)), SamplingParams(max_tokens=4, temperature=0))
    stats = engine.stats()
    recorded = engine.expert_load.double()
    assert recorded.sum() > 0

    as_json = tmp_path / "stats.json"
    as_json.write_text(json.dumps(stats))
    torch.testing.assert_close(read_expert_load(as_json, cfg), recorded)

    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    page = tmp_path / "metrics.prom"
    page.write_text(Metrics("nano", moe_layers).render(stats))
    torch.testing.assert_close(read_expert_load(page, cfg), recorded)

    with pytest.raises(ValueError, match="the model has"):
        read_expert_load(as_json, cfg.replace(n_routed_experts=16, n_group=1, topk_group=1))


def test_plan_reports_the_placement(tmp_path, capsys):
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"tokens_per_expert": skewed_load(layers=2, experts=8).tolist()}))
    assert main(["plan", "--model", "nano", "--gpus", "2", "--gpu-mem", "1GB", "--expert-load", str(load),
                 "--redundant-experts", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    before, after = (float(x) for x in line.split("max/mean rank load ")[1].split(" (")[0].split(" -> "))
    assert after < before
