"""A third DeepSeek-V3.2 config for the transformers parity tests (test_parity.py holds the first two and
the helpers used here), so that V3.2, like V3, is checked on three random configs in both directions.

It switches on what those two leave off: a single expert group, plain RoPE (no YaRN) with another base,
two dense layers, random attention biases, and an indexer key that is all RoPE (index_head_dim ==
qk_rope_head_dim, the smallest size validate() allows), with index_topk 4 of 40 keys.
"""
import pytest
import torch

from dsv32 import Transformer, save_pretrained

transformers = pytest.importorskip("transformers")
from test_parity import check_parity, hf_model_from, input_ids, load_transformers_checkpoint, make_config  # noqa: E402

# 16 indexer heads: with only a few, an untrained indexer often scores a key exactly 0 (every head's
# ReLU at zero), such ties reach the top-k boundary, and the two implementations break them differently
# (dsv32 by position, transformers by torch.topk's order; see bench/README.md), which is not a real difference.
CFG = dict(model_type="deepseek_v32", q_lora_rank=40, n_group=1, topk_group=1, first_k_dense_replace=2,
           num_hidden_layers=4, n_shared_experts=1, norm_topk_prob=True, rope_scaling=None, rope_theta=50000.0,
           attention_bias=True, index_n_heads=16, index_head_dim=8, index_topk=4)


def randomise_biases(model: torch.nn.Module) -> None:
    """Attention and indexer LayerNorm biases start at zero; random ones make them count in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)


def test_transformers_saves_dsv32_loads_same_logits(tmp_path):
    cfg = make_config(CFG)
    hf = hf_model_from(cfg, tmp_path)
    randomise_biases(hf)
    hf.save_pretrained(tmp_path / "hf")
    check_parity(hf, load_transformers_checkpoint(tmp_path / "hf"), cfg)


def test_dsv32_saves_transformers_loads_same_logits(tmp_path):
    cfg = make_config(CFG)
    torch.manual_seed(1)
    ours = Transformer(cfg).eval()
    randomise_biases(ours)
    with torch.no_grad():
        for name, buf in ours.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    save_pretrained(ours, tmp_path / "ours", dtype=torch.float32)
    hf, info = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    check_parity(hf.eval(), ours, cfg)


def test_parity_depends_on_the_sparse_selection(tmp_path):
    """Parity above would be vacuous if top-4 selection did not change these logits."""
    cfg = make_config(CFG)
    hf = hf_model_from(cfg, tmp_path)
    hf.save_pretrained(tmp_path / "hf")
    sparse = load_transformers_checkpoint(tmp_path / "hf")
    dense = Transformer(sparse.config.replace(index_topk=10_000)).eval()
    dense.load_state_dict(sparse.state_dict())
    ids = input_ids(cfg)
    with torch.no_grad():
        assert (sparse(ids).logits - dense(ids).logits).abs().max() > 1e-2
