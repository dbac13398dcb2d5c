"""ModelConfig: one dataclass whose fields are the Hugging Face `config.json` keys of DeepSeek-V3 / V3.2.

It reads both RoPE layouts (the official `rope_scaling` block with a top-level `rope_theta`, and the
transformers-5 `rope_parameters` block), keeps unknown keys so that a round trip loses nothing, and
answers size questions (parameters, active parameters, KV-cache bytes, FLOPs) from arithmetic alone,
so the 671B presets can be inspected without allocating a byte of weights.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

MODEL_TYPES = ("deepseek_v3", "deepseek_v32")
# keys transformers derives from the others and writes out; re-deriving them keeps edits consistent
DERIVED_KEYS = ("architectures", "head_dim", "qk_head_dim", "mlp_layer_types", "layer_types", "num_local_experts")

_YARN_671B = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v32"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    # attention (MLA); q_lora_rank None (or 0 in the official demo format) means a plain q_proj
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # mixture of experts (DeepSeekMoE)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # the sequence-wise balance loss weight alpha (the name the R1 release config uses); 0 disables it
    aux_loss_alpha: float = 0.0001
    # multi-token prediction
    num_nextn_predict_layers: int = 1
    # DeepSeek Sparse Attention (only used when model_type == "deepseek_v32")
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(_YARN_671B))
    # the rest of the HF config
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None
    # keys of config.json we do not model, kept verbatim and written back
    extra: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ derived shapes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def use_dsa(self) -> bool:
        """V3.2 puts the lightning indexer on every layer; V3 has none."""
        return self.model_type == "deepseek_v32"

    @property
    def use_q_lora(self) -> bool:
        return bool(self.q_lora_rank)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `num_hidden_layers + k` (an MTP layer) follows the same rule, so it is MoE in the releases."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type") or rs.get("type") or "default"

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 when YaRN is on (the HF/official rule)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        if self.rope_type == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        d = copy.deepcopy(raw)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        # RoPE: accept `rope_parameters` (transformers 5) as well as `rope_scaling` + top-level rope_theta
        rope_params = d.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            theta = rope_params.pop("rope_theta", None)
            if theta is not None and "rope_theta" not in d:
                d["rope_theta"] = theta
            kind = rope_params.get("rope_type") or rope_params.get("type") or "default"
            if "rope_scaling" not in d or d["rope_scaling"] is None:
                rope_params.pop("rope_type", None)
                d["rope_scaling"] = None if kind == "default" else {"type": kind, **rope_params}
        if isinstance(d.get("rope_scaling"), dict) and d["rope_scaling"].get("rope_type") == "default":
            d["rope_scaling"] = None
        # aliases used by transformers and the official demo
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        if d.get("q_lora_rank") == 0:
            d["q_lora_rank"] = None
        if d.get("n_routed_experts") is None and "n_routed_experts" in d:
            d["n_routed_experts"] = 0
        if "model_type" not in d:
            d["model_type"] = "deepseek_v32" if "index_topk" in d else "deepseek_v3"
        for key in DERIVED_KEYS:
            d.pop(key, None)
        values = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        # index_* keys are optional for V3 configs: defaults are harmless there
        return cls(**values, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config.json must hold a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_json(cfg_path)

    def to_dict(self) -> dict:
        """A config.json that the official layout and transformers 5.x both read."""
        d: dict[str, Any] = {}
        d["architectures"] = ["DeepseekV32ForCausalLM" if self.use_dsa else "DeepseekV3ForCausalLM"]
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if not self.use_dsa and f.name.startswith("index_"):
                continue
            if f.name == "quantization_config" and value is None:
                continue
            d[f.name] = copy.deepcopy(value)
        rope_parameters = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        for k, v in (self.rope_scaling or {}).items():
            if k not in ("type", "rope_type"):
                rope_parameters[k] = v
        d["rope_parameters"] = rope_parameters
        for k, v in self.extra.items():
            d.setdefault(k, copy.deepcopy(v))
        return dict(sorted(d.items()))

    def save(self, directory: str | os.PathLike) -> str:
        """Write config.json atomically into `directory`."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> "ModelConfig":
        problems: list[str] = []

        def need(cond: bool, message: str) -> None:
            if not cond:
                problems.append(message)

        need(self.model_type in MODEL_TYPES, f"model_type={self.model_type!r} must be one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "v_head_dim"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name}={getattr(self, name)!r} must be a positive integer")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim={self.qk_rope_head_dim} must be a positive even number (RoPE rotates pairs)")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, f"q_lora_rank={self.q_lora_rank} must be null or positive")
        need(self.num_key_value_heads == self.num_attention_heads,
             f"num_key_value_heads={self.num_key_value_heads} must equal num_attention_heads={self.num_attention_heads} (MLA)")
        need(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        need(0 <= self.first_k_dense_replace, f"first_k_dense_replace={self.first_k_dense_replace} must be >= 0")
        need(self.num_nextn_predict_layers >= 0, f"num_nextn_predict_layers={self.num_nextn_predict_layers} must be >= 0")
        need(self.scoring_func in ("sigmoid", "softmax"), f"scoring_func={self.scoring_func!r} must be 'sigmoid' or 'softmax'")
        if self.n_routed_experts > 0:
            need(self.moe_intermediate_size > 0, f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and n_routed_experts={self.n_routed_experts}")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group, f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
            if self.n_group >= 1 and self.n_routed_experts % self.n_group == 0 and 1 <= self.topk_group <= self.n_group:
                per_group = self.n_routed_experts // self.n_group
                need(self.topk_group * per_group >= self.num_experts_per_tok,
                     f"topk_group={self.topk_group} groups of {per_group} experts cannot hold num_experts_per_tok={self.num_experts_per_tok}")
                if self.n_group > 1:
                    need(per_group >= 2, f"n_routed_experts/n_group={per_group}: group scores use the top-2 experts of a group")
        need(self.n_shared_experts >= 0, f"n_shared_experts={self.n_shared_experts} must be >= 0")
        if self.use_dsa:
            need(self.use_q_lora, "model_type='deepseek_v32' needs q_lora_rank: the indexer reads the q latent")
            need(self.index_n_heads > 0 and self.index_topk > 0, f"index_n_heads={self.index_n_heads} and index_topk={self.index_topk} must be positive")
            need(self.index_head_dim >= self.qk_rope_head_dim,
                 f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim={self.qk_rope_head_dim} (RoPE covers its first part)")
        if self.rope_type == "yarn":
            rs = self.rope_scaling or {}
            need("factor" in rs and rs["factor"] >= 1, f"rope_scaling.factor={rs.get('factor')!r} must be >= 1 for YaRN")
            need("original_max_position_embeddings" in rs, "rope_scaling.original_max_position_embeddings is required for YaRN")
        elif self.rope_type != "default":
            problems.append(f"rope_scaling type {self.rope_type!r} is not supported (use 'yarn' or none)")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        return self

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        try:
            make = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
        return make().validate()

    # ------------------------------------------------------------------ accounting (no allocation)
    def _attention_params(self) -> int:
        h, d = self.num_attention_heads, self.hidden_size
        if self.use_q_lora:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        out = h * self.v_head_dim * d
        bias = 0
        if self.attention_bias:
            bias = (self.q_lora_rank or h * self.qk_head_dim) + self.kv_lora_rank + self.qk_rope_head_dim + d
        return q + kv + out + bias + self._indexer_params()

    def _indexer_params(self) -> int:
        if not self.use_dsa:
            return 0
        hi, di, d = self.index_n_heads, self.index_head_dim, self.hidden_size
        return self.q_lora_rank * hi * di + d * di + 2 * di + d * hi

    def _mlp_params(self, inter: int) -> int:
        return 3 * self.hidden_size * inter

    def _ffn_params(self, layer_idx: int, active: bool) -> int:
        if not self.is_moe_layer(layer_idx):
            return self._mlp_params(self.intermediate_size)
        router = self.n_routed_experts * self.hidden_size + self.n_routed_experts
        experts = self.num_experts_per_tok if active else self.n_routed_experts
        return router + (experts + self.n_shared_experts) * self._mlp_params(self.moe_intermediate_size)

    def _layer_params(self, layer_idx: int, active: bool) -> int:
        return 2 * self.hidden_size + self._attention_params() + self._ffn_params(layer_idx, active)

    def _mtp_params(self, active: bool) -> int:
        """Unique MTP parameters: embedding and head are shared with the main model."""
        d = self.hidden_size
        total = 0
        for k in range(self.num_nextn_predict_layers):
            total += 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, shared_head.norm
            total += self._layer_params(self.num_hidden_layers + k, active)
        return total

    def _embedding_params(self) -> int:
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + head + self.hidden_size  # + final norm

    def num_params(self, include_mtp: bool = False) -> int:
        total = self._embedding_params()
        total += sum(self._layer_params(i, active=False) for i in range(self.num_hidden_layers))
        return total + (self._mtp_params(active=False) if include_mtp else 0)

    def num_active_params(self, include_mtp: bool = False) -> int:
        """Parameters touched per token, counting the embedding row table and the head (as DeepSeek's 37B does)."""
        total = self._embedding_params()
        total += sum(self._layer_params(i, active=True) for i in range(self.num_hidden_layers))
        return total + (self._mtp_params(active=True) if include_mtp else 0)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype | str = torch.bfloat16, include_mtp: bool = False) -> int:
        """Bytes cached per token: the absorbed latent + rope key per layer, plus the indexer key for V3.2."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_layer = self.kv_lora_rank + self.qk_rope_head_dim + (self.index_head_dim if self.use_dsa else 0)
        layers = self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        return per_layer * itemsize * layers

    def flops_per_token(self, context_len: int = 0) -> int:
        """Forward FLOPs for one token: 2 per active matmul weight, plus attention over `context_len` keys.

        The embedding lookup costs no matmul. With DSA the main attention reads at most `index_topk` keys,
        while the indexer itself scores every key.
        """
        matmul = self.num_active_params() - self.vocab_size * self.hidden_size
        matmul -= self.hidden_size  # final norm
        matmul -= self.num_hidden_layers * 2 * self.hidden_size  # block norms
        attended = min(context_len, self.index_topk) if self.use_dsa else context_len
        per_layer = 2 * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * attended
        if self.use_dsa:
            per_layer += 2 * self.index_n_heads * self.index_head_dim * context_len
        return 2 * matmul + self.num_hidden_layers * per_layer


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---------------------------------------------------------------------- presets
def _v32_671b() -> ModelConfig:
    return ModelConfig(
        quantization_config={
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
        },
        extra={"ep_size": 1, "use_cache": True, "transformers_version": "4.44.2"},
    )


def _v3_671b() -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v3",
        quantization_config={
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        extra={"ep_size": 1, "use_cache": True},
    )


def _coder() -> ModelConfig:
    """The 671B V3.2 model with YaRN stretched from 4K to 256K positions (factor 64)."""
    cfg = _v32_671b()
    cfg.max_position_embeddings = 262144
    cfg.rope_scaling = dict(_YARN_671B, factor=64)
    return cfg


def _lite() -> ModelConfig:
    """The seed's Lite: V2-Lite width (2048, 16 heads, 27 layers) with 32 routed experts, top-6."""
    return ModelConfig(
        vocab_size=129280,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        n_routed_experts=32,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        first_k_dense_replace=1,
        model_type="deepseek_v3",
        num_nextn_predict_layers=1,
        max_position_embeddings=163840,
    )


def _tiny() -> ModelConfig:
    """The CPU demo model: ~20M parameters, DSA and MTP on, a short YaRN-scaled context."""
    return ModelConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=192,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=256,
        max_position_embeddings=4096,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        torch_dtype="float32",
    )


def _nano() -> ModelConfig:
    """The test model: < 2M parameters, every feature on (q-LoRA, groups, DSA with a small top-k, MTP)."""
    return ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=16,
        max_position_embeddings=1024,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 256,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        torch_dtype="float32",
    )


PRESETS = {
    "v3.2-671b": _v32_671b,
    "v3-671b": _v3_671b,
    "coder": _coder,
    "lite": _lite,
    "tiny": _tiny,
    "nano": _nano,
}
