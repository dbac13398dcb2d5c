"""Parity with an independent implementation: transformers' DeepseekV3ForCausalLM / DeepseekV32ForCausalLM.

Both directions go through the real checkpoint format: transformers saves and dsv32 loads, and the
reverse. Configs are small but switch on every feature that changes the math.
"""
import warnings

import pytest
import torch

from dsv32 import ModelConfig, Transformer, load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, num_nextn_predict_layers=1,
    max_position_embeddings=1024, initializer_range=0.1, torch_dtype="float32",
    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
)

V3_CONFIGS = {
    # q-LoRA, grouped routing, one dense layer, one shared expert, normalised weights, YaRN
    "qlora-groups": dict(model_type="deepseek_v3", q_lora_rank=24, n_group=2, topk_group=1,
                         first_k_dense_replace=1, n_shared_experts=1, norm_topk_prob=True),
    # plain q_proj, 4 groups keep 2, two dense layers, two shared experts, unnormalised, V2-Lite-style mscale
    "no-qlora": dict(model_type="deepseek_v3", q_lora_rank=None, n_group=4, topk_group=2,
                     first_k_dense_replace=2, n_shared_experts=2, norm_topk_prob=False,
                     routed_scaling_factor=1.0, num_hidden_layers=4,
                     rope_scaling={"type": "yarn", "factor": 8, "original_max_position_embeddings": 128,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # one group, no rope scaling, a different rope base
    "plain-rope": dict(model_type="deepseek_v3", q_lora_rank=40, n_group=1, topk_group=1,
                       first_k_dense_replace=1, n_shared_experts=2, norm_topk_prob=True,
                       rope_scaling=None, rope_theta=50000.0),
}

V32_CONFIGS = {
    # sequences of 40 with top-8 / top-16 keys: the sparse selection really changes the result
    "topk8": dict(model_type="deepseek_v32", q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=1,
                  n_shared_experts=1, index_n_heads=8, index_head_dim=16, index_topk=8),
    "topk16-shared2": dict(model_type="deepseek_v32", q_lora_rank=32, n_group=4, topk_group=2,
                           first_k_dense_replace=1, n_shared_experts=2, norm_topk_prob=False,
                           index_n_heads=8, index_head_dim=24, index_topk=16),
    # one group, plain RoPE with another base, two dense layers, random attention biases, an indexer key that
    # is all RoPE (index_head_dim == qk_rope_head_dim), top-4 of 40. 16 indexer heads: with few, an untrained
    # indexer often scores keys exactly 0 and the two sides break such ties differently (bench/README.md)
    "biased-plain-rope-topk4": dict(model_type="deepseek_v32", q_lora_rank=40, n_group=1, topk_group=1,
                                    first_k_dense_replace=2, num_hidden_layers=4, n_shared_experts=1,
                                    norm_topk_prob=True, rope_scaling=None, rope_theta=50000.0, attention_bias=True,
                                    index_n_heads=16, index_head_dim=8, index_topk=4),
}

HF_CLASS = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM"}
SEQ = 40


def make_config(changes) -> ModelConfig:
    return ModelConfig(**{**BASE, **changes}).validate()


def input_ids(cfg):
    return torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(7))


def randomise_biases(model: torch.nn.Module) -> torch.nn.Module:
    """A random balance bias, and random attention / indexer LayerNorm biases: they start at zero, which
    would leave them out of the logits the parity tests compare."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    return model


def hf_model_from(cfg: ModelConfig, tmp_path):
    """A randomly initialised transformers model for our config, with random biases."""
    cfg.save(tmp_path / "cfg")
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path / "cfg")
    torch.manual_seed(0)
    model = getattr(transformers, HF_CLASS[cfg.model_type])._from_config(hf_config, dtype=torch.float32).eval()
    return randomise_biases(model)


def check_parity(hf, ours, cfg):
    ids = input_ids(cfg)
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids).logits
    assert want.abs().max() > 0.1  # a test on near-zero logits would prove little
    assert (got - want).abs().max().item() <= 1e-4


def load_transformers_checkpoint(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_pretrained(path, dtype=torch.float32).eval()
    # transformers builds no MTP module, so its checkpoints have none: we load without one and say so
    assert ours.config.num_nextn_predict_layers == 0
    assert any("MTP" in str(w.message) for w in caught)
    return ours


@pytest.mark.parametrize("name", list(V3_CONFIGS) + list(V32_CONFIGS))
def test_transformers_saves_dsv32_loads_same_logits(name, tmp_path):
    cfg = make_config({**V3_CONFIGS, **V32_CONFIGS}[name])
    hf = hf_model_from(cfg, tmp_path)
    hf.save_pretrained(tmp_path / "hf")
    check_parity(hf, load_transformers_checkpoint(tmp_path / "hf"), cfg)


@pytest.mark.parametrize("name", list(V3_CONFIGS) + list(V32_CONFIGS))
def test_dsv32_saves_transformers_loads_same_logits(name, tmp_path):
    cfg = make_config({**V3_CONFIGS, **V32_CONFIGS}[name])
    torch.manual_seed(1)
    ours = randomise_biases(Transformer(cfg).eval())
    save_pretrained(ours, tmp_path / "ours", dtype=torch.float32)
    cls = getattr(transformers, HF_CLASS[cfg.model_type])
    hf, info = cls.from_pretrained(tmp_path / "ours", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    check_parity(hf.eval(), ours, cfg)


@pytest.mark.parametrize("name", list(V32_CONFIGS))
def test_v32_parity_depends_on_the_sparse_selection(name, tmp_path):
    """The V3.2 parity above would be vacuous if top-k selection did not change these logits."""
    cfg = make_config(V32_CONFIGS[name])
    hf = hf_model_from(cfg, tmp_path)
    hf.save_pretrained(tmp_path / "hf")
    sparse = load_transformers_checkpoint(tmp_path / "hf")
    dense = Transformer(sparse.config.replace(index_topk=10_000)).eval()
    dense.load_state_dict(sparse.state_dict())
    ids = input_ids(cfg)
    with torch.no_grad():
        gap = (sparse(ids).logits - dense(ids).logits).abs().max()
    assert gap > 1e-2


def test_decoding_with_our_cache_matches_transformers_generate(tmp_path):
    cfg = make_config(V32_CONFIGS["topk8"])
    hf = hf_model_from(cfg, tmp_path)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_transformers_checkpoint(tmp_path / "hf")
    prompt = input_ids(cfg)[:1, :12]
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 12:].tolist()
        cache = ours.new_cache(batch=1, max_len=32)
        logits = ours(prompt, cache=cache).logits[:, -1]
        got = []
        for step in range(12):
            token = int(logits.argmax(-1))
            got.append(token)
            logits = ours(torch.tensor([[token]]), start_pos=12 + step, cache=cache).logits[:, -1]
    assert got == want
