"""dsv32.checkpoint: the HF on-disk format (key mapping, tensor specs vs the release, save/load round
trips, FP8 block scales, transformers interop at the key level, bad inputs, atomic writes)."""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv32 import ModelConfig, Transformer
from dsv32 import checkpoint as ckpt
from dsv32.checkpoint import from_hf_key, hf_layout, load_pretrained, save_pretrained, tensor_specs, to_hf_key


def _reference_dir() -> Path | None:
    for cand in (Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs",
                 Path("/work/shared/reference/configs")):
        if cand.is_dir():
            return cand
    return None


REF = _reference_dir()
needs_ref = pytest.mark.skipif(REF is None, reason="shared/reference/configs not found beside the clone (../shared)")

NANO = ModelConfig.preset("nano")  # deepseek_v32: q-LoRA, DSA, 1 dense + 2 MoE layers, 1 MTP layer
# deepseek_v3 without q-LoRA, 2 dense layers, 2 shared experts, attention biases, two MTP layers
NANO_V3 = NANO.replace(model_type="deepseek_v3", q_lora_rank=None, first_k_dense_replace=2, num_hidden_layers=4,
                       n_shared_experts=2, attention_bias=True, num_nextn_predict_layers=2, norm_topk_prob=False)


def random_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> Transformer:
    """Every tensor random (norm gains and the balance bias included), so no round trip passes by luck."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(torch.randn(t.shape) * (0.5 if t.ndim == 1 else 0.05) + (1.0 if name.endswith("norm.weight") else 0.0))
    model.to(dtype)
    return model


def written_specs(directory) -> dict[str, tuple[tuple[int, ...], str]]:
    specs = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                specs[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return specs


def read_all(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_state(a: Transformer, b: Transformer, skip_prefix: str | None = None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if not (skip_prefix and k.startswith(skip_prefix))]
    assert keys == [k for k in sb if not (skip_prefix and k.startswith(skip_prefix))]
    for k in keys:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k].float(), sb[k].float()), k


def no_temp_files(directory) -> bool:
    return not [p for p in os.listdir(directory) if p.endswith(".tmp") or p.startswith(".")]


# ---------------------------------------------------------------------- key mapping
@pytest.mark.parametrize("cfg", [NANO, NANO_V3], ids=["v32", "v3"])
def test_key_mapping_is_a_bijection(cfg):
    layout = hf_layout(cfg)
    names = [t.name for t in layout]
    assert len(names) == len(set(names))
    for t in layout:
        assert from_hf_key(t.name, cfg) == (t.key, t.expert, t.copy)
        if not t.copy:
            assert to_hf_key(t.key, cfg, t.expert) == t.name
    # every parameter and buffer of the model is covered, experts once per index
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    covered = {(t.key, t.expert) for t in layout if not t.copy}
    expected = {(k, e) for k, s in shapes.items() for e in (range(s[0]) if ".mlp.experts." in k else [None])}
    assert covered == expected


def test_key_mapping_examples():
    L = NANO_V3.num_hidden_layers
    assert to_hf_key("layers.2.mlp.experts.up_proj", NANO_V3, 5) == "model.layers.2.mlp.experts.5.up_proj.weight"
    assert to_hf_key("mtp.1.mlp.experts.down_proj", NANO_V3, 0) == f"model.layers.{L + 1}.mlp.experts.0.down_proj.weight"
    assert to_hf_key("mtp.0.eh_proj.weight", NANO_V3) == f"model.layers.{L}.eh_proj.weight"
    assert to_hf_key("norm.weight", NANO_V3) == "model.norm.weight"
    assert to_hf_key("lm_head.weight", NANO_V3) == "lm_head.weight"
    assert from_hf_key(f"model.layers.{L + 1}.shared_head.head.weight", NANO_V3) == ("lm_head.weight", None, True)
    assert from_hf_key(f"model.layers.{L}.embed_tokens.weight", NANO_V3) == ("embed_tokens.weight", None, True)
    assert from_hf_key(f"model.layers.{L}.shared_head.norm.weight", NANO_V3) == ("mtp.0.shared_head.norm.weight", None, False)
    assert from_hf_key("model.layers.1.self_attn.q_proj.weight", NANO_V3) == ("layers.1.self_attn.q_proj.weight", None, False)


# ---------------------------------------------------------------------- specs vs the release
def _read_tsv(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split("\t")[:3]
        out[name] = (tuple(int(x) for x in shape.strip("[]").split(",")), dtype)
    return out


@needs_ref
@pytest.mark.parametrize("preset, tsv, count, real_config", [
    ("v3-671b", "deepseek-v3-fp8-tensors.tsv", 91991, "hf-deepseek-v3-config.json"),
    ("v3.2-671b", "deepseek-v3.2-fp8-tensors.tsv", 92425, "hf-deepseek-v3.2-config.json"),
])
def test_tensor_specs_equal_the_release(preset, tsv, count, real_config):
    release = _read_tsv(REF / tsv)
    assert len(release) == count
    specs = tensor_specs(ModelConfig.preset(preset), fp8=True)
    assert len(specs) == count
    assert set(specs) == set(release)
    wrong = {k: (specs[k], release[k]) for k in specs if specs[k] != release[k]}
    assert not wrong, list(wrong.items())[:5]
    # the release's own config.json gives the same list
    assert tensor_specs(ModelConfig.from_pretrained(REF / real_config), fp8=True) == release


@needs_ref
def test_every_real_hf_config_loads():
    files = sorted(REF.glob("hf-*config*.json"))
    files = [f for f in files if "generation" not in f.name and "tokenizer" not in f.name]
    assert len(files) >= 4
    for f in files:
        raw = json.loads(f.read_text())
        cfg = ModelConfig.from_pretrained(f).validate()
        assert cfg.model_type == raw["model_type"]
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts) == (7168, 61, 256)
        assert cfg.num_nextn_predict_layers == 1 and cfg.quantization_config["weight_block_size"] == [128, 128]
        preset = ModelConfig.preset("v3.2-671b" if cfg.use_dsa else "v3-671b")
        assert tensor_specs(cfg, fp8=True) == tensor_specs(preset, fp8=True), f.name


def test_tensor_specs_dtype_rules_without_fp8():
    v32 = tensor_specs(NANO, dtype="BF16")
    assert not any(k.endswith("_scale_inv") for k in v32)
    assert v32["model.layers.1.mlp.gate.e_score_correction_bias"] == ((8,), "F32")
    assert v32["model.layers.0.input_layernorm.weight"] == ((64,), "F32")          # V3.2 keeps norms F32
    assert v32["model.layers.0.self_attn.indexer.k_norm.bias"] == ((16,), "F32")
    assert v32["model.layers.0.self_attn.q_a_proj.weight"] == ((32, 64), "BF16")
    assert v32["model.layers.3.embed_tokens.weight"] == ((512, 64), "BF16")       # the MTP copy
    v3 = tensor_specs(NANO_V3, dtype=torch.float16)
    assert v3["model.norm.weight"] == ((64,), "F16")                               # V3 norms follow dtype
    assert v3["model.layers.2.mlp.gate.e_score_correction_bias"] == ((8,), "F32")
    assert v3["model.layers.0.self_attn.q_proj.weight"] == ((96, 64), "F16")
    assert v3["model.layers.0.self_attn.o_proj.bias"] == ((64,), "F16")
    assert {d for _, d in tensor_specs(NANO, dtype="F32").values()} == {"F32"}
    # without FP8 the 671B list is the release's minus its 45,932 scale tensors
    assert len(tensor_specs(ModelConfig.preset("v3.2-671b"))) == 92425 - 45932


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("cfg", [NANO, NANO_V3], ids=["v32", "v3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 20_000], ids=["single", "sharded"])
def test_round_trip_exact(tmp_path, cfg, dtype, max_shard_bytes):
    model = random_model(cfg, dtype=dtype)
    out = save_pretrained(model, tmp_path, max_shard_bytes=max_shard_bytes)
    assert out == str(tmp_path) and no_temp_files(tmp_path)

    specs = tensor_specs(cfg, dtype=dtype)
    assert written_specs(tmp_path) == specs
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if max_shard_bytes > 2**20:
        assert files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        n = len(files)
        assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(specs)
        assert index["metadata"]["total_size"] == sum(
            torch.empty(s, dtype=getattr(torch, ckpt._torch_name(d))).nbytes for s, d in specs.values())
        for shard in files:  # every tensor sits in the shard the index names
            with safe_open(str(tmp_path / shard), framework="pt") as h:
                assert all(index["weight_map"][k] == shard for k in h.keys())

    saved_cfg = json.loads((tmp_path / "config.json").read_text())
    assert saved_cfg["torch_dtype"] == str(dtype).removeprefix("torch.") and "quantization_config" not in saved_cfg

    loaded = load_pretrained(tmp_path, dtype=dtype)
    assert_same_state(model, loaded)
    assert loaded.embed_tokens.weight.dtype == dtype
    assert loaded.layers[-1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert loaded.config.num_nextn_predict_layers == cfg.num_nextn_predict_layers
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_into_other_dtype_and_existing_model(tmp_path):
    model = random_model(NANO)
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        expect = a if k.endswith(("e_score_correction_bias", "norm.weight", "norm.bias")) else a.bfloat16().float()
        assert torch.equal(expect, b), k  # V3.2 norms and the bias were stored F32: exact
    target = random_model(NANO, seed=1)
    ckpt.load_state_dict_into(target, tmp_path)
    assert_same_state(loaded, target)


def test_tied_embeddings_round_trip(tmp_path):
    cfg = NANO.replace(tie_word_embeddings=True)
    model = random_model(cfg)
    save_pretrained(model, tmp_path)
    names = written_specs(tmp_path)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert_same_state(model, loaded)


def test_load_reads_shard_by_shard_and_never_holds_the_checkpoint_twice(tmp_path, monkeypatch):
    """Every tensor the model needs is read once, the shards one after another, and each read tensor is
    dropped once copied into the model (at most a weight and two scales alive at any time)."""
    save_pretrained(random_model(NANO), tmp_path, fp8=True, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    reads, alive, peak = [], set(), [0]
    real_safe_open = ckpt.safe_open

    class SpyOpen:  # safe_open, recording get_tensor calls and how many of their tensors are still alive
        def __init__(self, filename, framework):
            self.file, self.handle = Path(filename).name, real_safe_open(filename, framework=framework)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def get_tensor(self, name):
            tensor = self.handle.get_tensor(name)
            reads.append((self.file, name))
            alive.add(id(tensor))
            weakref.finalize(tensor, alive.discard, id(tensor))
            peak[0] = max(peak[0], len(alive))
            return tensor

    monkeypatch.setattr(ckpt, "safe_open", SpyOpen)
    loaded = load_pretrained(tmp_path)
    names = [name for _, name in reads]
    copies = {t.name for t in hf_layout(NANO) if t.copy}  # the MTP's embedding / head duplicates: not needed
    assert sorted(names) == sorted(set(written_specs(tmp_path)) - copies)  # each needed tensor exactly once
    order = [shards.index(f) for f, name in reads if not name.endswith("_scale_inv")]
    assert len(shards) > 2 and order == sorted(order)
    assert peak[0] <= 3 and not alive
    assert loaded.layers[0].self_attn.o_proj.weight.dtype == torch.float32


def test_stale_shards_are_removed_and_tokenizer_copied(tmp_path):
    model = random_model(NANO)
    out = tmp_path / "ckpt"
    save_pretrained(model, out, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    tok = tmp_path / "tok"
    tok.mkdir()
    contents = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": '{"bos_token": "<s>"}',
                "generation_config.json": '{"temperature": 0.6}'}
    for name, text in contents.items():
        (tok / name).write_text(text)
    (tok / "unrelated.txt").write_text("x")
    save_pretrained(model, out, tokenizer_dir=tok)
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *contents])
    for name, text in contents.items():
        assert (out / name).read_text() == text
    assert_same_state(model, load_pretrained(out))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        save_pretrained(model, out, tokenizer_dir=tmp_path / "nope")


# ---------------------------------------------------------------------- FP8
def _fp8_names(specs):
    return [k for k, (_, d) in specs.items() if d == "F8_E4M3"]


@pytest.mark.parametrize("cfg", [NANO, NANO_V3], ids=["v32", "v3"])
def test_fp8_round_trip_within_fp8_error(tmp_path, cfg):
    model = random_model(cfg)
    save_pretrained(model, tmp_path, fp8=True, max_shard_bytes=30_000)
    specs = tensor_specs(cfg, fp8=True)
    assert written_specs(tmp_path) == specs and no_temp_files(tmp_path)
    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "fp8" and quant["fmt"] == "e4m3" and quant["weight_block_size"] == [128, 128]
    assert ("scale_fmt" in quant) == cfg.use_dsa  # V3.2's release says ue8m0, V3's says nothing

    loaded = load_pretrained(tmp_path)
    assert loaded.config.quantization_config is None
    stored = read_all(tmp_path)
    ours = model.state_dict()
    back = loaded.state_dict()
    layout = {t.name: t for t in hf_layout(cfg)}
    fp8_names = _fp8_names(specs)
    assert len(fp8_names) > 20
    for name in fp8_names:
        t = layout[name]
        w = ours[t.key] if t.expert is None else ours[t.key][t.expert]
        w_back = back[t.key] if t.expert is None else back[t.key][t.expert]
        q, s = stored[name], stored[name + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        scale = s[torch.arange(w.shape[0])[:, None] // 128, torch.arange(w.shape[1])[None, :] // 128]
        assert torch.equal(w_back, q.float() * scale), name  # load dequantises exactly W_fp8 * scale_inv
        # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormals: absolute <= 2^-10 * scale
        assert ((w - w_back).abs() <= w.abs() / 16 + scale / 1024 + 1e-12).all(), name
        assert (w != w_back).any(), name  # it really was quantised
        if cfg.use_dsa:
            assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # ue8m0: powers of two
        else:
            assert torch.allclose(s, w.abs().max() / 448, rtol=1e-6)  # one block: amax / 448
    for t in layout.values():  # the rest: BF16 (rounded) or F32 (exact), as tensor_specs says
        if t.copy or t.name in fp8_names:
            continue
        w = ours[t.key] if t.expert is None else ours[t.key][t.expert]
        w_back = back[t.key] if t.expert is None else back[t.key][t.expert]
        assert torch.equal(w_back, w.bfloat16().float() if specs[t.name][1] == "BF16" else w), t.name
    # dequantised into the requested dtype: bf16 holds the fp32 dequantisation rounded once (the bias stays fp32)
    low = load_pretrained(tmp_path, dtype=torch.bfloat16).state_dict()
    assert low["layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert low[f"layers.{cfg.num_hidden_layers - 1}.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    for k, v in low.items():
        assert torch.equal(v, back[k].to(v.dtype)), k


def test_fp8_partial_blocks_hand_made_scales(tmp_path):
    """A 130x200 kv_a_proj_with_mqa: 2x2 blocks, three of them partial; each element is fp8 x its block's scale."""
    cfg = NANO.replace(hidden_size=200, kv_lora_rank=122, num_nextn_predict_layers=0)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    model = random_model(cfg)
    save_pretrained(model, tmp_path, fp8=True)
    tensors = read_all(tmp_path)
    assert tensors[name].shape == (130, 200) and tensors[name + "_scale_inv"].shape == (2, 2)

    torch.manual_seed(3)
    values = (torch.randn(130, 200) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    corners = {(0, 0): 1.0, (127, 127): -2.0, (128, 0): 3.0, (0, 128): 0.5, (129, 199): 448.0, (127, 199): -0.25}
    for (i, j), v in corners.items():
        values[i, j] = v
    scales = torch.tensor([[2.0, 0.3], [0.25, 8.0]])
    tensors[name], tensors[name + "_scale_inv"] = values, scales
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    w = load_pretrained(tmp_path).layers[0].self_attn.kv_a_proj_with_mqa.weight
    v = values.float()
    expected = torch.empty(130, 200)
    expected[:128, :128] = v[:128, :128] * 2.0
    expected[:128, 128:] = v[:128, 128:] * 0.3
    expected[128:, :128] = v[128:, :128] * 0.25
    expected[128:, 128:] = v[128:, 128:] * 8.0
    assert torch.equal(w, expected)
    assert w[0, 0] == 2.0 and w[127, 127] == -4.0 and w[128, 0] == 0.75
    assert w[0, 128] == torch.tensor(0.5) * torch.tensor(0.3) and w[129, 199] == 3584.0 and w[127, 199] == torch.tensor(-0.25) * torch.tensor(0.3)

    tensors[name + "_scale_inv"] = torch.ones(1, 2)  # a scale of the wrong (floor-div) shape
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"kv_a_proj_with_mqa.weight_scale_inv: expected \[2, 2\].*found \[1, 2\]"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------- transformers interop (key level)
@pytest.mark.parametrize("cfg", [NANO, NANO_V3], ids=["v32", "v3"])
def test_transformers_loads_ours_and_we_load_theirs(tmp_path, cfg):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cls = transformers.DeepseekV32ForCausalLM if cfg.use_dsa else transformers.DeepseekV3ForCausalLM
    model = random_model(cfg)
    save_pretrained(model, tmp_path / "ours", dtype=torch.bfloat16)
    hf, info = cls.from_pretrained(tmp_path / "ours", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    # transformers builds no MTP: our MTP layers are its only unexpected keys
    mtp_prefixes = tuple(f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers))
    assert info["unexpected_keys"] and all(k.startswith(mtp_prefixes) for k in info["unexpected_keys"])
    layer = cfg.num_hidden_layers - 1
    inter = cfg.moe_intermediate_size
    bf = lambda t: t.bfloat16().float()  # noqa: E731
    assert torch.equal(hf.model.layers[layer].mlp.experts.down_proj, bf(model.layers[layer].mlp.experts.down_proj))
    assert torch.equal(hf.model.layers[layer].mlp.experts.gate_up_proj[:, inter:], bf(model.layers[layer].mlp.experts.up_proj))
    assert torch.equal(hf.model.layers[layer].mlp.gate.e_score_correction_bias, model.layers[layer].mlp.gate.e_score_correction_bias)
    assert torch.equal(hf.lm_head.weight, bf(model.lm_head.weight))

    hf.save_pretrained(tmp_path / "theirs")
    with pytest.warns(UserWarning, match="no MTP tensors.*num_nextn_predict_layers=0"):
        loaded = load_pretrained(tmp_path / "theirs")
    assert loaded.config.num_nextn_predict_layers == 0 and len(loaded.mtp) == 0
    reference = load_pretrained(tmp_path / "ours")  # the same weights (bf16-rounded), with MTP
    assert_same_state(reference, loaded, skip_prefix="mtp.")
    assert torch.equal(loaded.layers[layer].mlp.experts.gate_proj, hf.model.layers[layer].mlp.experts.gate_up_proj[:, :inter])

    # an existing model with MTP keeps its MTP weights when filled from theirs
    target = random_model(cfg, seed=5)
    mtp_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("mtp.")}
    with pytest.warns(UserWarning, match="no MTP tensors"):
        ckpt.load_state_dict_into(target, tmp_path / "theirs")
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in mtp_before.items())
    assert_same_state(reference, target, skip_prefix="mtp.")


# ---------------------------------------------------------------------- bad inputs
@pytest.fixture
def saved(tmp_path):
    model = random_model(NANO)
    save_pretrained(model, tmp_path)
    return tmp_path


def test_missing_unexpected_and_wrong_shape_in_one_error(saved):
    tensors = read_all(saved)
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    tensors["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(4, 4)
    tensors["model.layers.2.mlp.experts.7.down_proj.weight"] = torch.zeros(64, 31)
    save_file(tensors, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_pretrained(saved)
    msg = str(err.value)
    assert "missing (1)" in msg and "model.layers.1.self_attn.kv_b_proj.weight [128, 32]" in msg
    assert "unexpected (1)" in msg and "model.layers.0.mlp.experts.0.gate_proj.weight [4, 4]" in msg
    assert "wrong shape (1)" in msg and "experts.7.down_proj.weight: expected [64, 32], found [64, 31]" in msg
    # strict=False tolerates missing / unexpected, never a wrong shape
    with pytest.raises(ValueError, match="wrong shape"):
        load_pretrained(saved, strict=False)


def test_strict_false_keeps_initial_values(saved):
    tensors = read_all(saved)
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="1 missing.*1 unexpected"):
        model = load_pretrained(saved, strict=False)
    assert torch.isfinite(model.layers[1].self_attn.kv_b_proj.weight).all()
    assert torch.equal(model.layers[1].self_attn.kv_a_proj_with_mqa.weight,
                       tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"])


def test_long_lists_are_truncated(saved):
    tensors = {k: v for k, v in read_all(saved).items() if ".mlp.experts." not in k}
    save_file(tensors, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \(72\):(.|\n)*\.\.\. and 52 more") as err:
        load_pretrained(saved)
    assert len(str(err.value).splitlines()) < 40


def test_partial_mtp_is_an_error(saved):
    tensors = read_all(saved)
    del tensors["model.layers.3.enorm.weight"]
    save_file(tensors, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.3.enorm.weight(.|\n)*MTP layer.*only partly present"):
        load_pretrained(saved)


def test_mtp_beyond_config_is_skipped(saved):
    with pytest.warns(UserWarning, match="ignoring .* MTP layers beyond num_nextn_predict_layers=0"):
        model = load_pretrained(saved, config=NANO.replace(num_nextn_predict_layers=0))
    assert len(model.mtp) == 0


def test_fp8_weight_without_scale(tmp_path):
    save_pretrained(random_model(NANO), tmp_path, fp8=True)
    tensors = read_all(tmp_path)
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \(1\):\s+model.layers.0.self_attn.o_proj.weight_scale_inv \[1, 1\]"):
        load_pretrained(tmp_path)


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "nowhere")
    os.remove(saved / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(saved)
    empty = tmp_path / "only_config"
    NANO.save(empty)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_pretrained(empty)


def test_missing_or_corrupt_shard(tmp_path):
    save_pretrained(random_model(NANO), tmp_path, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].write_bytes(b"\x07garbage" * 8)
    with pytest.raises(ValueError, match=f"{shards[1].name}: not a readable safetensors file"):
        load_pretrained(tmp_path)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        load_pretrained(tmp_path)


def test_index_pointing_at_the_wrong_shard(tmp_path):
    save_pretrained(random_model(NANO), tmp_path, max_shard_bytes=20_000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.0.self_attn.o_proj.weight"
    other = next(f for f in index["weight_map"].values() if f != index["weight_map"][name])
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"listed in the index but not in that shard(.|\n)*{name} \\(index says {other}\\)"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------- atomic writes
def test_failed_save_leaves_the_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    first = random_model(NANO)
    save_pretrained(first, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def exploding_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(random_model(NANO, seed=1), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert_same_state(first, load_pretrained(tmp_path))
