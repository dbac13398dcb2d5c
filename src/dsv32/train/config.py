"""TrainConfig: every knob of a pretraining or SFT run, in one dataclass (written into the run directory)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

INDEXER_STAGES = ("off", "dense_warmup", "sparse")


@dataclass
class TrainConfig:
    stage: str = "pretrain"                 # pretrain | sft (recorded in the lineage)
    out: str = "runs/pretrain"              # the run directory
    data: str = ""                          # a prepared data directory (`dsv32 data prepare`)
    tokenizer: str = ""                     # tokenizer directory (for bits-per-byte and the export)
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # ModelConfig overrides
    init: str = ""                          # start from this HF-layout checkpoint (continual training, SFT)
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 8                     # sequences per micro-batch per rank
    grad_accum: int = 1
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "wsd"                   # wsd | cosine | constant
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3                 # weight of the multi-token-prediction loss (0: MTP not run)
    aux_alpha: float | None = None          # sequence-wise balance loss weight (None: the model config's)
    bias_gamma: float = 0.001               # aux-loss-free bias update speed (0: frozen)
    indexer_stage: str = "off"              # off | dense_warmup (only the indexer trains) | sparse
    precision: str = "fp32"                 # fp32 | bf16 (autocast)
    device: str = "auto"
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 1
    ckpt_every: int = 100
    keep_last: int = 2
    plot: bool = True
    progress: bool = True
    stop_after: int | None = None           # end this process after this step (tests, time-boxed runs)

    def validate(self) -> "TrainConfig":
        problems = []
        if self.stage not in ("pretrain", "sft"):
            problems.append(f"stage={self.stage!r} must be pretrain or sft")
        if self.indexer_stage not in INDEXER_STAGES:
            problems.append(f"indexer_stage={self.indexer_stage!r} must be one of {', '.join(INDEXER_STAGES)}")
        if self.precision not in ("fp32", "bf16"):
            problems.append(f"precision={self.precision!r} must be fp32 or bf16")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "keep_last", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be positive")
        if not self.data:
            problems.append("no data: give a prepared data directory (dsv32 data prepare ...)")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        """Read a JSON or TOML file of TrainConfig fields, then apply `overrides`."""
        return cls(**{**read_settings_file(cls, path, "training"), **overrides})


def read_settings_file(cls, path: str | os.PathLike, what: str) -> dict:
    """The fields of dataclass `cls` from a JSON or TOML file; unknown keys and parse errors are one clear line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one clear line
        raise ValueError(f"{path}: cannot parse ({exc})") from None
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{path}: unknown {what} settings {', '.join(unknown)}")
    return raw


