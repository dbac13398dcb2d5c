import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
import torch

from dsv32 import ModelConfig, Transformer
from dsv32.config import PRESETS


def test_671b_counts_match_the_reference_arithmetic():
    v3, v32 = ModelConfig.preset("v3-671b"), ModelConfig.preset("v3.2-671b")
    assert v3.num_params() == 671_026_419_200
    assert v3.num_active_params() == 37_552_297_472
    assert v32.num_params() == v3.num_params() + 61 * 13_959_424  # one indexer per layer
    assert round(v32.num_params() / 1e9, 2) == 671.88
    assert round(v32.num_active_params() / 1e9, 2) == 38.40
    # the MTP module adds 11.61B unique parameters (embedding and head are shared)
    assert v3.num_params(include_mtp=True) - v3.num_params() == 11_610_068_224


@pytest.mark.parametrize("name", ["v3-671b", "v3.2-671b"])
def test_meta_device_model_has_exactly_the_counted_parameters(name):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):
        Transformer(ModelConfig.preset("nano"))  # pays torch's one-time meta-dispatch set-up
    start = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(cfg)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    main += sum(b.numel() for n, b in model.named_buffers() if not n.startswith("mtp."))  # routing biases
    mtp += sum(b.numel() for n, b in model.named_buffers() if n.startswith("mtp."))
    assert time.perf_counter() - start < 1.0
    assert main == cfg.num_params()
    assert main + mtp == cfg.num_params(include_mtp=True)


REFERENCE = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs",
                               Path("/work/shared/reference/configs")) if p.is_dir()), None)


@pytest.mark.skipif(REFERENCE is None, reason="shared/reference/configs not found beside the clone (../shared)")
@pytest.mark.parametrize("name, real", [("v3-671b", "hf-deepseek-v3-config.json"),
                                        ("v3.2-671b", "hf-deepseek-v3.2-config.json")])
def test_671b_presets_are_the_released_configs(name, real):
    preset, released = ModelConfig.preset(name), ModelConfig.from_pretrained(REFERENCE / real)
    # every modelled field (routing constants, RoPE, eps, quantisation, token ids...), not only the shapes;
    # `extra` holds file metadata such as auto_map and transformers_version
    differ = [f.name for f in dataclasses.fields(ModelConfig)
              if f.name != "extra" and getattr(preset, f.name) != getattr(released, f.name)]
    assert not differ, differ


def test_small_presets_sizes():
    tiny, nano = ModelConfig.preset("tiny"), ModelConfig.preset("nano")
    assert 10e6 <= tiny.num_params() <= 40e6 and tiny.use_dsa and tiny.num_nextn_predict_layers >= 1
    assert nano.num_params(include_mtp=True) < 2e6 and nano.use_dsa
    lite = ModelConfig.preset("lite")
    assert lite.n_routed_experts == 32 and lite.num_experts_per_tok == 6 and lite.hidden_size < 7168
    coder = ModelConfig.preset("coder")
    assert coder.max_position_embeddings == 262144
    assert coder.rope_scaling["factor"] * coder.rope_scaling["original_max_position_embeddings"] == 262144


def test_kv_cache_bytes_per_token():
    v3, v32 = ModelConfig.preset("v3-671b"), ModelConfig.preset("v3.2-671b")
    assert v3.kv_cache_bytes_per_token(torch.bfloat16) == 1152 * 61 == 70_272
    assert v32.kv_cache_bytes_per_token(torch.bfloat16) == (512 + 64 + 128) * 2 * 61
    assert v3.kv_cache_bytes_per_token(torch.float32) == 2 * 70_272


def test_flops_grow_with_context_but_dsa_caps_the_attention_part():
    v3, v32 = ModelConfig.preset("v3-671b"), ModelConfig.preset("v3.2-671b")
    # at zero context: 2 FLOPs per active matmul weight (no embedding lookup, no norms)
    matmul = v3.num_active_params() - v3.vocab_size * v3.hidden_size - v3.hidden_size - 61 * 2 * v3.hidden_size
    assert v3.flops_per_token(0) == 2 * matmul
    dense_growth = v3.flops_per_token(65536) - v3.flops_per_token(32768)
    sparse_growth = v32.flops_per_token(65536) - v32.flops_per_token(32768)
    assert dense_growth == 61 * 2 * 128 * (192 + 128) * 32768       # QK and PV over 32K more keys
    assert sparse_growth == 61 * 2 * 64 * 128 * 32768               # only the indexer still scales


def test_softmax_scale_includes_yarn_mscale():
    cfg = ModelConfig.preset("v3.2-671b")
    assert cfg.softmax_scale == pytest.approx(0.13523378, rel=1e-6)
    plain = cfg.replace(rope_scaling=None)
    assert plain.softmax_scale == pytest.approx(192 ** -0.5)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_roundtrip_through_config_json(tmp_path, name):
    cfg = ModelConfig.preset(name)
    cfg.save(tmp_path)
    again = ModelConfig.from_pretrained(tmp_path)
    assert again == cfg


def test_reads_rope_parameters_and_keeps_unknown_keys(tmp_path):
    raw = ModelConfig.preset("nano").to_dict()
    raw.pop("rope_scaling")
    raw.pop("rope_theta")
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8,
                              "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
                              "mscale": 1.0, "mscale_all_dim": 1.0}
    raw["my_custom_key"] = {"keep": [1, 2]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg.rope_theta == 50000.0 and cfg.rope_scaling["factor"] == 8 and cfg.rope_type == "yarn"
    written = cfg.to_dict()
    assert written["my_custom_key"] == {"keep": [1, 2]}
    assert written["rope_parameters"]["rope_theta"] == 50000.0 and written["rope_scaling"]["type"] == "yarn"


def test_written_config_is_read_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.preset("v3.2-671b")
    cfg.save(tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "DeepseekV32Config"
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40
    assert hf.rope_parameters["rope_theta"] == 10000 and hf.index_topk == 2048
    assert hf.n_group == 8 and hf.first_k_dense_replace == 3


@pytest.mark.parametrize("changes, fields", [
    (dict(n_routed_experts=10, n_group=4), ["n_routed_experts", "n_group"]),
    (dict(topk_group=9), ["topk_group"]),
    (dict(num_experts_per_tok=300), ["num_experts_per_tok"]),
    (dict(index_head_dim=32), ["index_head_dim", "qk_rope_head_dim"]),
    (dict(q_lora_rank=None), ["q_lora_rank"]),
    (dict(model_type="llama"), ["model_type"]),
    (dict(qk_rope_head_dim=63), ["qk_rope_head_dim"]),
])
def test_validate_names_the_inconsistent_fields(changes, fields):
    cfg = ModelConfig.preset("v3.2-671b").replace(**changes)
    with pytest.raises(ValueError) as err:
        cfg.validate()
    for name in fields:
        assert name in str(err.value)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")


def test_bad_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path / "missing")


def test_official_demo_style_q_lora_zero_means_plain_q_proj():
    cfg = ModelConfig.from_dict({**ModelConfig.preset("lite").to_dict(), "q_lora_rank": 0})
    assert cfg.q_lora_rank is None and not cfg.use_q_lora
    assert math.isclose(cfg.num_params(), ModelConfig.preset("lite").num_params())
