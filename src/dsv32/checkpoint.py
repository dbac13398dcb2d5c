"""Hugging Face checkpoints of DeepSeek-V3 / V3.2: the one module that knows the on-disk format.

Layout (as released by DeepSeek and as transformers reads and writes it):
- `config.json` (ModelConfig fields = its keys; `quantization_config` when weights are FP8),
- `model.safetensors`, or shards `model-00001-of-0000N.safetensors` + `model.safetensors.index.json`
  (`{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}`),
- tokenizer / generation files next to them.

Key mapping (ours <-> HF), defined once in `to_hf_key` / `from_hf_key` and used by save, load and
`tensor_specs`:
- our keys are the HF keys without `model.`; `lm_head.weight` keeps its name;
- routed experts are stacked here (`layers.N.mlp.experts.gate_proj` [E, inter, hidden]) and stored per
  expert there (`model.layers.N.mlp.experts.{e}.gate_proj.weight` [inter, hidden]);
- MTP depth k is `mtp.k.*` here and `model.layers.{num_hidden_layers + k}.*` there; the checkpoint also
  holds that layer's `embed_tokens.weight` and `shared_head.head.weight` as copies of the main embedding
  and head (written on save, accepted and ignored on load).

Stored dtypes (`tensor_specs`):
- fp8=True reproduces the release exactly: float8_e4m3fn + F32 `weight_scale_inv` [ceil(out/128),
  ceil(in/128)] (W = W_fp8 * scale_inv per block; powers of two when the config says scale_fmt "ue8m0",
  as V3.2's does) for the attention, MLP, expert and indexer wq_b/wk projections; `dtype` (BF16 in the
  release) for embeddings, heads, router weight, eh_proj and indexer weights_proj; F32 for
  `e_score_correction_bias`; norm weights (and the indexer's LayerNorm weight/bias) F32 for deepseek_v32
  and `dtype` for deepseek_v3 — that is what the two releases ship.
- fp8=False uses the same rule minus the quantisation: everything `dtype`, except the F32 balance bias
  and, for deepseek_v32 with a 16-bit dtype, F32 norms (as the release, and its official BF16 cast, keep
  them). Norm gains are tiny; keeping them at full precision costs nothing and loses nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv32.config import ModelConfig
from dsv32.model.fp8 import WEIGHT_BLOCK, dequantize_weight, quantize_weight
from dsv32.model.transformer import Transformer

__all__ = [
    "HFTensor", "to_hf_key", "from_hf_key", "hf_layout", "tensor_specs",
    "save_pretrained", "load_pretrained", "load_state_dict_into", "checkpoint_files",
    "TensorSlice", "load_sharded", "stored_nbytes",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SCALE_SUFFIX = "_scale_inv"  # `x.weight` -> `x.weight_scale_inv`

# modules whose weight the release stores as FP8 (q_proj: the no-q-LoRA variant, quantised like wq)
FP8_MODULES = frozenset({
    "q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj", "wq_b", "wk",
})
# MTP-layer duplicates of main-model tensors: HF sub-name -> our key
MTP_COPIES = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_NORM_RE = re.compile(r"(^|\.)\w*norm\.(weight|bias)$")  # RMSNorm gains, indexer k_norm (LayerNorm)
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED_RE = re.compile(r"\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")  # our stacked expert params
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.*)$")
_MTP_RE = re.compile(r"^mtp\.(\d+)\.(.*)$")
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_MAX_LISTED = 20  # entries per category in a mismatch error


# ---------------------------------------------------------------------- dtypes
def st_dtype(dtype: torch.dtype | str) -> str:
    """torch.bfloat16 / "bfloat16" / "bf16" / "BF16" -> "BF16" (the safetensors spelling)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _ST_DTYPES:
            raise ValueError(f"dtype {dtype} cannot be stored in a checkpoint")
        return _ST_DTYPES[dtype]
    name = str(dtype).removeprefix("torch.")
    if name.upper() in _TORCH_DTYPES:
        return name.upper()
    aliases = {"bf16": "BF16", "fp16": "F16", "half": "F16", "fp32": "F32", "float": "F32", "fp64": "F64"}
    if name.lower() in aliases:
        return aliases[name.lower()]
    torch_dtype = getattr(torch, name, None)
    if isinstance(torch_dtype, torch.dtype):
        return st_dtype(torch_dtype)
    raise ValueError(f"unknown dtype {dtype!r}")


def _torch_name(st: str) -> str:
    return str(_TORCH_DTYPES[st]).removeprefix("torch.")


# ---------------------------------------------------------------------- key mapping (the single source of truth)
class HFTensor(NamedTuple):
    name: str                 # key in the HF checkpoint
    key: str                  # our state_dict key it comes from / goes to
    expert: int | None        # index into our stacked expert tensor, else None
    shape: tuple[int, ...]    # shape in the checkpoint (one expert's matrix for experts)
    copy: bool = False        # an MTP duplicate of embed_tokens / lm_head: written on save, ignored on load


def to_hf_key(key: str, cfg: ModelConfig, expert: int | None = None) -> str:
    """Our state_dict key (+ expert index for stacked experts) -> HF checkpoint key."""
    if key == "lm_head.weight":
        return key
    m = _MTP_RE.match(key)
    if m:
        key = f"layers.{cfg.num_hidden_layers + int(m[1])}.{m[2]}"
    if expert is not None:
        prefix, proj = key.rsplit(".", 1)  # "layers.N.mlp.experts", "gate_proj"
        key = f"{prefix}.{expert}.{proj}.weight"
    return "model." + key


def from_hf_key(name: str, cfg: ModelConfig) -> tuple[str, int | None, bool]:
    """HF checkpoint key -> (our key, expert index or None, is an MTP copy). Inverse of `to_hf_key`.

    `*.weight_scale_inv` names are not handled here: a scale belongs to the weight named without `_scale_inv`.
    """
    if name == "lm_head.weight":
        return name, None, False
    if not name.startswith("model."):
        raise KeyError(f"{name!r} is not a DeepSeek checkpoint key")
    key = name[len("model."):]
    m = _LAYER_RE.match(key)
    if m and int(m[1]) >= cfg.num_hidden_layers:
        if m[2] in MTP_COPIES:
            return MTP_COPIES[m[2]], None, True
        key = f"mtp.{int(m[1]) - cfg.num_hidden_layers}.{m[2]}"
    m = _EXPERT_RE.match(key)
    if m:
        return f"{m[1]}.{m[3]}", int(m[2]), False
    return key, None, False


def _meta_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def hf_layout(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]] | None = None) -> list[HFTensor]:
    """Every tensor of the HF checkpoint of `cfg` (FP8 scales aside), in file order.

    `shapes` are our state_dict shapes (default: those of a meta-device model of `cfg`).
    """
    shapes = _meta_shapes(cfg) if shapes is None else shapes
    out: list[HFTensor] = []
    for key, shape in shapes.items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue  # the same parameter as embed_tokens.weight; HF stores it once
        if _STACKED_RE.search(key):
            # stacked [E, out, in] -> E matrices [out, in]
            out.extend(HFTensor(to_hf_key(key, cfg, e), key, e, tuple(shape[1:])) for e in range(shape[0]))
        else:
            out.append(HFTensor(to_hf_key(key, cfg), key, None, tuple(shape)))
    for k in range(cfg.num_nextn_predict_layers):
        for sub, src in MTP_COPIES.items():
            out.append(HFTensor(to_hf_key(f"mtp.{k}.{sub}", cfg), src, None, tuple(shapes[src]), copy=True))
    return out


def _is_fp8_candidate(t: HFTensor) -> bool:
    module, param = t.name.rsplit(".", 2)[-2:]
    return param == "weight" and module in FP8_MODULES and len(t.shape) == 2


def _scale_shape(shape: tuple[int, ...], block: int = WEIGHT_BLOCK) -> tuple[int, int]:
    return (-(-shape[0] // block), -(-shape[1] // block))


def _stored_dtype(t: HFTensor, cfg: ModelConfig, fp8: bool, dtype: str) -> str:
    """The safetensors dtype of one tensor (rules in the module docstring)."""
    if t.name.endswith("e_score_correction_bias"):
        return "F32"
    if fp8 and _is_fp8_candidate(t):
        return "F8_E4M3"
    if _NORM_RE.search(t.name) and cfg.use_dsa and _ITEMSIZE[dtype] < 4:
        return "F32"
    return dtype


def tensor_specs(config: ModelConfig, fp8: bool = False, dtype: torch.dtype | str = "BF16"
                 ) -> dict[str, tuple[tuple[int, ...], str]]:
    """{HF name: (shape, safetensors dtype)} of exactly what `save_pretrained` writes; allocates nothing."""
    return _specs(config, hf_layout(config), fp8, st_dtype(dtype))


def _specs(cfg: ModelConfig, layout: list[HFTensor], fp8: bool, dtype: str, block: int = WEIGHT_BLOCK
           ) -> dict[str, tuple[tuple[int, ...], str]]:
    specs = {}
    for t in layout:
        stored = _stored_dtype(t, cfg, fp8, dtype)
        specs[t.name] = (t.shape, stored)
        if stored == "F8_E4M3":
            specs[t.name + SCALE_SUFFIX] = (_scale_shape(t.shape, block), "F32")
    return specs


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = _ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------------- atomic file helpers
@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path in the same directory; on success it replaces `path` in one rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only when the write failed
            tmp.unlink()


def _write_json(path: Path, obj) -> None:
    with _atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


# ---------------------------------------------------------------------- save
def _release_quantization_config(cfg: ModelConfig) -> dict:
    """The release's block: V3.2 adds scale_fmt "ue8m0" (power-of-two scales); an existing block wins."""
    q = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    if cfg.use_dsa:
        q["scale_fmt"] = "ue8m0"
    if cfg.quantization_config:
        q.update(cfg.quantization_config)
    return dict(sorted(q.items()))


def _weight_block(quant: dict | None) -> int:
    size = (quant or {}).get("weight_block_size", [WEIGHT_BLOCK, WEIGHT_BLOCK])
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"weight_block_size={size}: only square FP8 blocks are supported")
    return int(size[0])


def _plan_shards(layout: list[HFTensor], specs: dict, max_shard_bytes: int) -> list[list[HFTensor]]:
    """Greedy packing in file order; a weight and its scale stay together; an oversize tensor sits alone."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in layout:
        n = _nbytes(*specs[t.name])
        if t.name + SCALE_SUFFIX in specs:
            n += _nbytes(*specs[t.name + SCALE_SUFFIX])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _export(t: HFTensor, state: dict[str, torch.Tensor], stored: str, block: int, pow2: bool
            ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensor(s) of one layout entry: a fresh CPU tensor (plus its scale when FP8)."""
    src = state[t.key].detach()
    if t.expert is not None:
        src = src[t.expert]  # [out, in] view of the stacked [E, out, in]
    if stored == "F8_E4M3":
        q, scale_inv = quantize_weight(src.float(), block=block, pow2_scale=pow2)
        yield t.name, q.cpu()
        yield t.name + SCALE_SUFFIX, scale_inv.cpu()
    else:
        # copy=True: safetensors refuses tensors that share storage (expert views, tied weights)
        yield t.name, src.to(device="cpu", dtype=_TORCH_DTYPES[stored], copy=True).contiguous()


def _copy_tokenizer(tokenizer_dir: str | os.PathLike, out: Path) -> None:
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory {src} does not exist")
    present = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not present:
        raise FileNotFoundError(f"{src} holds none of the tokenizer files {', '.join(TOKENIZER_FILES)}")
    for name in present:
        if (src / name).resolve() == (out / name).resolve():
            continue
        with _atomic_path(out / name) as tmp:
            shutil.copyfile(src / name, tmp)


def save_pretrained(model: Transformer, out_dir: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    fp8: bool = False, max_shard_bytes: int = 5 * 2**30,
                    tokenizer_dir: str | os.PathLike | None = None) -> str:
    """Write `model` in the HF layout (loadable by transformers and by `load_pretrained`); returns out_dir.

    dtype: of the unquantised tensors (default: the model's dtype, or BF16 with fp8 as in the release).
    fp8: block-quantise the projection weights to float8_e4m3fn with 128x128 F32 `weight_scale_inv`.
    Shards are generated one at a time (only one shard's tensors exist at once), every file is
    written to a temp name and renamed, and stale shards of an earlier save in out_dir are removed.
    """
    cfg = model.config
    state = model.state_dict()
    if dtype is None:
        dtype = torch.bfloat16 if fp8 else model.embed_tokens.weight.dtype
    dtype = st_dtype(dtype)
    if dtype.startswith("F8"):
        raise ValueError(f"dtype={dtype} is for quantised weights only; use fp8=True with a 16/32-bit dtype")
    quant = _release_quantization_config(cfg) if fp8 else None
    block, pow2 = _weight_block(quant), (quant or {}).get("scale_fmt") == "ue8m0"

    layout = hf_layout(cfg, {k: tuple(v.shape) for k, v in state.items()})
    specs = _specs(cfg, layout, fp8, dtype, block)
    shards = _plan_shards(layout, specs, max_shard_bytes)
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for fname, group in zip(names, shards):
        tensors = {}
        for t in group:
            for name, tensor in _export(t, state, specs[t.name][1], block, pow2):
                tensors[name] = tensor
                weight_map[name] = fname
        with _atomic_path(out / fname) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        del tensors  # keep one shard in memory at a time
    if n > 1:
        total = sum(_nbytes(*specs[name]) for name in weight_map)
        _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})

    cfg.replace(torch_dtype=_torch_name(dtype), quantization_config=quant).save(out)
    _remove_stale(out, keep=set(names) | ({INDEX_FILE} if n > 1 else set()))
    if tokenizer_dir is not None:
        _copy_tokenizer(tokenizer_dir, out)
    return str(out)


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Shards / index of an earlier save with a different shard count would shadow or confuse this one."""
    for p in out.iterdir():
        ours = p.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.match(p.name)
        if ours and p.name not in keep and p.is_file():
            p.unlink()


# ---------------------------------------------------------------------- reading a checkpoint
class StoredTensor(NamedTuple):
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (index json first, else model.safetensors)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from None
        files = [root / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    raise FileNotFoundError(f"{root} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def _read_headers(files: list[Path]) -> dict[str, StoredTensor]:
    """Names, shapes and dtypes of every stored tensor, from the headers only (no tensor data read)."""
    stored: dict[str, StoredTensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
                headers = [(name, f.get_slice(name)) for name in names]
                headers = [(name, tuple(sl.get_shape()), sl.get_dtype()) for name, sl in headers]
        except Exception as exc:  # safetensors raises its own error type for truncated / garbage files
            raise ValueError(f"{file}: not a readable safetensors file ({exc})") from None
        for name, shape, dtype in headers:
            if name in stored:
                raise ValueError(f"{name} is stored twice: in {stored[name].file.name} and {file.name}")
            stored[name] = StoredTensor(file, shape, dtype)
    return stored


def _index_problems(root: Path, stored: dict[str, StoredTensor]) -> list[str]:
    index = root / INDEX_FILE
    if not index.is_file():
        return []
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    return [f"{name} (index says {shard})" for name, shard in weight_map.items()
            if name not in stored or stored[name].file.name != shard]


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more


class _Plan(NamedTuple):
    load: list[tuple[HFTensor, str | None]]  # (entry, name of its F32 scale when stored as FP8)
    missing: list[HFTensor]
    unexpected: list[str]
    skipped_mtp: list[str]


def _match(layout: list[HFTensor], stored: dict[str, StoredTensor], cfg: ModelConfig, block: int
           ) -> tuple[_Plan, list[str]]:
    """Pair checkpoint tensors with layout entries; returns the plan and the wrong-shape messages."""
    by_name = {t.name: t for t in layout}
    load, missing, wrong = [], [], []
    consumed: set[str] = set()
    for t in layout:
        s = stored.get(t.name)
        if s is None:
            if not t.copy:
                missing.append(t)
            continue
        consumed.add(t.name)
        if s.shape != t.shape:
            wrong.append(f"{t.name}: expected {_fmt_shape(t.shape)}, found {_fmt_shape(s.shape)}")
            continue
        if t.copy:
            continue  # the main embedding / head is loaded from its own key
        scale = None
        if s.dtype.startswith("F8"):
            scale = t.name + SCALE_SUFFIX
            sc = stored.get(scale)
            if sc is None:
                missing.append(HFTensor(scale, t.key, t.expert, _scale_shape(t.shape, block)))
                continue
            consumed.add(scale)
            if sc.shape != _scale_shape(t.shape, block):
                wrong.append(f"{scale}: expected {_fmt_shape(_scale_shape(t.shape, block))} "
                             f"for a {_fmt_shape(t.shape)} FP8 weight, found {_fmt_shape(sc.shape)}")
                continue
        load.append((t, scale))
    unexpected, skipped_mtp = [], []
    for name, s in stored.items():
        if name in consumed:
            continue
        if _beyond_mtp(name, cfg):
            skipped_mtp.append(name)
        elif name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in by_name:
            unexpected.append(f"{name} {_fmt_shape(s.shape)} (its weight is not FP8)")
        else:
            unexpected.append(f"{name} {_fmt_shape(s.shape)}")
    return _Plan(load, missing, unexpected, skipped_mtp), wrong


def _beyond_mtp(name: str, cfg: ModelConfig) -> bool:
    """A tensor of an MTP layer the config does not ask for (layer index >= num_hidden_layers + n_mtp)."""
    m = _LAYER_RE.match(name.removeprefix("model.")) if name.startswith("model.") else None
    return m is not None and int(m[1]) >= cfg.num_hidden_layers + cfg.num_nextn_predict_layers


def _check(root: Path, cfg: ModelConfig, plan: _Plan, wrong: list[str], index_problems: list[str],
           strict: bool) -> None:
    """Raise ONE ValueError listing every mismatch (strict), or warn about what strict=False tolerates."""
    parts = []
    if plan.missing and strict:
        parts.append(_listing("missing", [f"{t.name} {_fmt_shape(t.shape)}" for t in plan.missing]))
        mtp_missing = sum(t.key.startswith("mtp.") for t in plan.missing)
        if mtp_missing:
            parts.append(f"  note: the MTP layer(s) model.layers.{cfg.num_hidden_layers}+ are only partly present "
                         f"({mtp_missing} tensor(s) missing); a checkpoint must hold all of them or none")
    if plan.unexpected and strict:
        parts.append(_listing("unexpected", plan.unexpected))
    if wrong:
        parts.append(_listing("wrong shape", wrong))
    if index_problems:
        parts.append(_listing("listed in the index but not in that shard", index_problems))
    if parts:
        what = f"{cfg.model_type}, {cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP"
        raise ValueError(f"checkpoint {root} does not match the model config ({what}):\n" + "\n".join(parts))
    if plan.missing or plan.unexpected:
        warnings.warn(f"{root}: {len(plan.missing)} missing tensor(s) keep their initial values, "
                      f"{len(plan.unexpected)} unexpected tensor(s) ignored (strict=False)", stacklevel=3)
    if plan.skipped_mtp:
        warnings.warn(f"{root}: ignoring {len(plan.skipped_mtp)} tensor(s) of MTP layers beyond "
                      f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}", stacklevel=3)


def _without_mtp_if_absent(root: Path, layout: list[HFTensor], stored: dict[str, StoredTensor],
                           cfg: ModelConfig) -> bool:
    """True (with a warning) when the checkpoint has no MTP tensor at all, as when transformers saved it."""
    names = [t.name for t in layout if t.key.startswith("mtp.")]
    if not names or any(n in stored for n in names):
        return False  # none expected, or (some) present: partial MTP is reported as missing tensors
    warnings.warn(f"{root} has no MTP tensors (model.layers.{cfg.num_hidden_layers}.*), as in checkpoints saved "
                  f"by transformers: loading with num_nextn_predict_layers=0", stacklevel=3)
    return True


@torch.no_grad()
def _fill(model: Transformer, plan: _Plan, stored: dict[str, StoredTensor], block: int) -> None:
    """Copy every planned tensor into the model, shard by shard (tensors are read from the mmap one at a
    time, so at most one tensor exists besides the model), dequantising FP8 with its block scales."""
    targets = model.state_dict(keep_vars=True)
    files = sorted({s.file for s in stored.values()})
    order = {f: i for i, f in enumerate(files)}
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
        for t, scale in sorted(plan.load, key=lambda p: order[stored[p[0].name].file]):
            value = handles[stored[t.name].file].get_tensor(t.name)
            if scale is not None:  # the scale may live in another shard
                scale_inv = handles[stored[scale].file].get_tensor(scale)
                value = dequantize_weight(value, scale_inv, dtype=torch.float32, block=block)
            dest = targets[t.key]
            (dest[t.expert] if t.expert is not None else dest).copy_(value)


def _prepare(root: Path, stored: dict[str, StoredTensor], cfg: ModelConfig, layout: list[HFTensor],
             block: int, strict: bool) -> _Plan:
    plan, wrong = _match(layout, stored, cfg, block)
    _check(root, cfg, plan, wrong, _index_problems(root, stored), strict)
    return plan


def load_state_dict_into(model: Transformer, path: str | os.PathLike, strict: bool = True) -> Transformer:
    """Fill an existing model (any device / dtype) from the checkpoint at `path`; returns the model.

    A checkpoint without any MTP tensor leaves the model's MTP weights untouched (with a warning).
    """
    root = Path(path)
    files = checkpoint_files(root)
    stored = _read_headers(files)
    quant = None
    if (root / "config.json").is_file():
        quant = ModelConfig.from_pretrained(root).quantization_config
    cfg = model.config
    layout = hf_layout(cfg, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if _without_mtp_if_absent(root, layout, stored, cfg):
        layout = [t for t in layout if not (t.key.startswith("mtp.") or t.copy)]
    plan = _prepare(root, stored, cfg, layout, _weight_block(quant), strict)
    _fill(model, plan, stored, _weight_block(quant))
    return model


def _meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def _materialise(model: Transformer, dtype: torch.dtype, device: torch.device | str) -> Transformer:
    """Meta model -> uninitialised storage on `device` in `dtype` (the balance bias stays fp32)."""
    model.to(dtype)
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            module.e_score_correction_bias = bias.float()  # added to fp32 router scores; stored F32
    model.to_empty(device=device)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty gives each module its own tensor
    return model


def _open_for_loading(root: Path, config: ModelConfig | None, dtype: torch.dtype, strict: bool
                      ) -> tuple[ModelConfig, Transformer, dict[str, StoredTensor], _Plan, int]:
    """Config, meta model, stored headers and load plan of the checkpoint at `root` (headers only are read)."""
    cfg = config if config is not None else ModelConfig.from_pretrained(root)
    files = checkpoint_files(root)
    stored = _read_headers(files)
    block = _weight_block(cfg.quantization_config)
    cfg = cfg.replace(quantization_config=None, torch_dtype=str(dtype).removeprefix("torch."))

    model = _meta_model(cfg)
    layout = hf_layout(cfg, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if _without_mtp_if_absent(root, layout, stored, cfg):
        cfg = cfg.replace(num_nextn_predict_layers=0)
        model = _meta_model(cfg)
        layout = hf_layout(cfg, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    plan = _prepare(root, stored, cfg, layout, block, strict)
    return cfg, model, stored, plan, block


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    config: ModelConfig | None = None, strict: bool = True) -> Transformer:
    """Build a Transformer from an HF-layout checkpoint directory (ours, transformers' or the release).

    The model is built on the meta device and materialised once in `dtype` on `device`; tensors are
    then copied in shard by shard, FP8 weights dequantised with their `weight_scale_inv` and
    per-expert matrices written into the stacked expert parameters. The returned model's config has
    no `quantization_config` (its weights are dense now). A checkpoint with no MTP tensor at all
    loads with num_nextn_predict_layers=0 (warning); anything else that does not match raises one
    ValueError listing every missing, unexpected and wrongly shaped tensor.
    """
    root = Path(path)
    _, model, stored, plan, block = _open_for_loading(root, config, dtype, strict)
    model = _materialise(model, dtype, device)
    if plan.missing:  # strict=False: what the checkpoint lacks starts from the usual init
        model.init_weights()
    _fill(model, plan, stored, block)
    return model


# ---------------------------------------------------------------------- loading one rank's slice
class TensorSlice(NamedTuple):
    """Which part of a full-model tensor a (parallelised) model's tensor holds.

    `key` is the full model's state_dict key. `dim`/`start`/`stop`: a contiguous range along one
    dimension of the full tensor (dim None: all of it). `experts`: for stacked routed experts, the
    expert held by each row of the local stack (an expert may appear on several ranks).
    """

    key: str
    dim: int | None = None
    start: int = 0
    stop: int = 0
    experts: tuple[int, ...] | None = None


def load_sharded(path: str | os.PathLike, shard, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", config: ModelConfig | None = None,
                 strict: bool = True) -> Transformer:
    """Load only this process's part of a checkpoint into a parallelised model.

    `shard(meta_model) -> {local key: TensorSlice}` turns the full model, still on the meta device,
    into this rank's model (swapping modules in place) and says where each local tensor comes from
    (keys it does not list are whole tensors under the same name). Only then is storage allocated,
    for the local tensors alone, and each is filled from the safetensors mmap with `get_slice`: a
    sliced FP8 weight reads just the 128-aligned rows/columns around its range and their scales, and
    is dequantised on the fly. Peak host memory is the rank's share plus one tensor slice. The
    checkpoint is validated exactly as `load_pretrained` does.
    """
    root = Path(path)
    cfg, model, stored, plan, block = _open_for_loading(root, config, dtype, strict)
    slices = shard(model)
    model = _materialise(model, dtype, device)
    if plan.missing:
        model.init_weights()
    _fill_slices(model, slices, plan, stored, block)
    return model


@torch.no_grad()
def _fill_slices(model: Transformer, slices: dict[str, TensorSlice], plan: _Plan,
                 stored: dict[str, StoredTensor], block: int) -> None:
    entries = {(t.key, t.expert): (t, scale) for t, scale in plan.load}
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def handle(name: str):
            file = stored[name].file
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            return handles[file]

        for key, dest in model.state_dict(keep_vars=True).items():
            sl = slices.get(key, TensorSlice(key))
            if sl.experts is not None:
                for row, expert in enumerate(sl.experts):
                    entry = entries.get((sl.key, expert))
                    if entry is not None:
                        dest[row].copy_(_read_slice(handle, *entry, sl, block))
                continue
            entry = entries.get((sl.key, None))
            if entry is not None:  # absent: a tied head, or strict=False (initialised above)
                dest.copy_(_read_slice(handle, *entry, sl, block))


def _read_slice(handle, t: HFTensor, scale: str | None, sl: TensorSlice, block: int) -> torch.Tensor:
    """One tensor, or the range `sl` of it, as stored (FP8 dequantised to fp32)."""
    if sl.dim is None or sl.experts is not None:
        value = handle(t.name).get_tensor(t.name)
        if scale is not None:
            value = dequantize_weight(value, handle(scale).get_tensor(scale), dtype=torch.float32, block=block)
        return value
    lo, hi = sl.start, sl.stop
    if scale is not None:  # whole scale blocks: read the block-aligned range, dequantise, then trim
        lo, hi = lo // block * block, min(-(-hi // block) * block, t.shape[sl.dim])
    value = _take(handle(t.name).get_slice(t.name), sl.dim, lo, hi)
    if scale is not None:
        scale_inv = _take(handle(scale).get_slice(scale), sl.dim, lo // block, -(-hi // block))
        value = dequantize_weight(value, scale_inv, dtype=torch.float32, block=block)
        value = value.narrow(sl.dim, sl.start - lo, sl.stop - sl.start)
    return value


def _take(view, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, stop) of a safetensors slice view, read from the file."""
    if dim == 0:
        return view[start:stop]
    if dim == 1:
        return view[:, start:stop]
    raise ValueError(f"slices are taken along dim 0 or 1, not {dim}")


def stored_nbytes(cfg: ModelConfig, key: str, shape: tuple[int, ...], fp8: bool, dtype: torch.dtype | str = "BF16"
                  ) -> int:
    """Bytes of a tensor of shape `shape` holding (part of) our tensor `key`, stored as `tensor_specs` would
    store it: FP8 projection weights count 1 byte per element plus their F32 block scales."""
    stacked = _STACKED_RE.search(key) is not None
    matrix = tuple(shape[1:]) if stacked else tuple(shape)
    count = shape[0] if stacked else 1
    t = HFTensor(to_hf_key(key, cfg, 0 if stacked else None), key, 0 if stacked else None, matrix)
    kind = _stored_dtype(t, cfg, fp8, st_dtype(dtype))
    n = _nbytes(matrix, kind)
    if kind == "F8_E4M3":
        n += _nbytes(_scale_shape(matrix), "F32")
    return count * n
