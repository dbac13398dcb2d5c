"""`dsv32 plan`: the 671B preset's per-rank weights and KV cache against hand arithmetic."""
from __future__ import annotations

import pytest

from dsv32 import ModelConfig
from dsv32.cli import CLIError, main
from dsv32.infer.plan import make_plan, parse_size

D, VOCAB, BLOCK = 7168, 129280, 128
H200 = 141 * 2**30


def fp8(rows: int, cols: int) -> int:
    """An FP8 weight as the release stores it: 1 byte per element + an F32 scale per 128x128 block."""
    return rows * cols + -(-rows // BLOCK) * -(-cols // BLOCK) * 4


def v32_fp8_rank_bytes(n: int) -> int:
    """One rank of `n` holding V3.2-671B in the release's dtypes (norms F32, other unquantised tensors BF16)."""
    heads = 128 // n
    norm = 4                                                        # bytes per norm element (F32)
    attention = (2 * D * norm                                       # input / post-attention norms
                 + fp8(1536, D) + 1536 * norm                       # q_a_proj, q_a_layernorm (replicated)
                 + fp8(heads * 192, 1536)                           # q_b_proj: this rank's heads
                 + fp8(576, D) + 512 * norm                         # kv_a_proj_with_mqa, kv_a_layernorm
                 + fp8(heads * 256, 512)                            # kv_b_proj: this rank's heads
                 + fp8(D, heads * 128))                             # o_proj: this rank's heads' columns
    indexer = fp8(64 * 128, 1536) + fp8(128, D) + 2 * 128 * norm + 64 * D * 2   # replicated
    dense = 2 * fp8(18432 // n, D) + fp8(D, 18432 // n)
    moe = (256 * D * 2 + 256 * 4                                    # router weight (BF16) + balance bias (F32)
           + (256 // n) * (2 * fp8(2048, D) + fp8(D, 2048))         # this rank's routed experts
           + 2 * fp8(2048 // n, D) + fp8(D, 2048 // n))             # its slice of the shared expert
    embed_head = 2 * (VOCAB // n) * D * 2
    mtp_extra = 2 * D * norm + 2 * D * D * 2 + D * norm            # enorm, hnorm, eh_proj (BF16), shared_head.norm
    layer = attention + indexer
    return (embed_head + D * norm + 3 * (layer + dense) + 58 * (layer + moe)
            + layer + moe + mtp_extra)                              # the MTP layer


def test_671b_fp8_on_8_h200_matches_hand_arithmetic():
    cfg = ModelConfig.preset("v3.2-671b")
    plan = make_plan(cfg, "v3.2-671b", gpus=8, gpu_mem=H200, dtype="fp8", context=32768, batch=16)
    assert plan.weight_bytes == v32_fp8_rank_bytes(8)
    assert plan.kv_bytes_per_token == (512 + 64 + 128) * 2 * 61 == 85_888
    assert plan.kv_capacity_tokens == (int(H200 * 0.9) - plan.weight_bytes) // 85_888
    assert plan.fits and plan.kv_capacity_tokens >= 32768 * 16
    # about an eighth of the ~690 GB checkpoint each, plus what every rank holds whole
    assert 85e9 < plan.weight_bytes < 90e9 and plan.replicated_bytes < 0.03 * plan.weight_bytes


def test_671b_bf16_does_not_fit_8_h200_and_v3_caches_less():
    bf16 = make_plan(ModelConfig.preset("v3.2-671b"), "v3.2-671b", gpus=8, gpu_mem=H200, dtype="bf16")
    assert not bf16.fits and bf16.weight_bytes > H200
    # the MTP layer's cache is added when speculating; V3 has no indexer key
    v3 = ModelConfig.preset("v3-671b")
    assert v3.kv_cache_bytes_per_token() == (512 + 64) * 2 * 61 == 70_272
    assert v3.kv_cache_bytes_per_token(include_mtp=True) == (512 + 64) * 2 * 62


def test_plan_command(capsys):
    assert main(["plan", "--model", "v3.2-671b", "--gpus", "8", "--gpu-mem", "141GiB", "--context", "32768",
                 "--batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "weights per rank" in out and "85,888 bytes" in out and "-> fits" in out
    assert main(["plan", "--model", "nano", "--gpus", "3", "--gpu-mem", "1GB"]) == 1
    assert "not divisible by the 3 ranks" in capsys.readouterr().err
    assert main(["plan", "--model", "nano", "--gpus", "2", "--gpu-mem", "lots"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_parse_size():
    assert parse_size("141GiB") == 141 * 2**30 and parse_size("80GB") == 80 * 10**9 and parse_size("512") == 512
    with pytest.raises(CLIError):
        parse_size("12 parsecs")
