"""The training loop shared by pretraining and SFT.

One optimizer step = `grad_accum` micro-batches per rank. The loss of every micro-batch is its *sum*
of token losses divided by the global number of target tokens of the whole step (all micro-batches,
all ranks), so accumulation, padding and uneven documents give exactly the gradient of the mean over
the step's tokens. Around that: DeepSeek's MTP loss (weight lambda), the sequence-wise balance loss
(alpha), the auxiliary-loss-free bias update (speed gamma, once per optimizer step, from the training
forwards' expert counts only), and the DSA indexer stages. Everything needed to continue exactly —
model (with the balance biases), optimizer, scheduler, data position, RNG — is checkpointed atomically.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dsv32.config import ModelConfig
from dsv32.data.loader import IGNORE_INDEX, PackedLoader
from dsv32.model.transformer import Transformer
from dsv32.train import distributed as dist_utils
from dsv32.train.balance import BiasBalancer
from dsv32.train.metrics import MetricsLog, measure_matmul_peak, plot_run, training_flops_per_token
from dsv32.train.optim import build_optimizer, build_scheduler
from dsv32.train.config import TrainConfig
from dsv32.train.state import ResumableTrainer

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------- losses
@torch.no_grad()
def loss_totals(model, batches, token_bytes: torch.Tensor | None = None, autocast=nullcontext, device=None) -> torch.Tensor:
    """[nats, target tokens, target bytes] (float64) summed over `batches` of `PackedLoader` form; the
    bytes are those of the target tokens (`token_byte_lengths`), 0 without a table."""
    device = device or model.embed_tokens.weight.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    table = token_bytes.to(device) if token_bytes is not None else None
    for batch in batches:
        labels = batch["labels"].to(device)
        with autocast():
            out = model(batch["input_ids"].to(device), positions=batch["position_ids"].to(device),
                        doc_ids=batch["doc_starts"].to(device).cumsum(1), labels=labels)
        totals[0] += out.loss_sum.double()
        valid = labels != IGNORE_INDEX
        totals[1] += valid.sum()
        if table is not None:
            totals[2] += table[labels[valid]].sum()
    return totals


def loss_metrics(totals: torch.Tensor) -> dict:
    """{"loss": nats per token, "bpb": bits per byte (when bytes were counted)} from `loss_totals`."""
    if totals[1] == 0:
        return {}
    result = {"loss": float(totals[0] / totals[1])}
    if totals[2] > 0:
        result["bpb"] = float(totals[0] / (totals[2] * math.log(2)))
    return result


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """Bytes each token id stands for (float64, [vocab_size]; ids past the tokenizer's vocabulary: 0)."""
    lengths = [len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths + [0] * max(0, vocab_size - len(lengths)), dtype=torch.float64)


def mtp_labels(labels: torch.Tensor, doc_ids: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets of MTP depth k (0-based) at position i: the token i+2+k, i.e. labels[i+1+k].

    A position whose next token belongs to another packed document gets no target: the MTP module
    would be combining one document's state with another's token.
    """
    shifted = labels[:, 1 + depth:]
    n = shifted.shape[1]
    crosses = doc_ids[:, :n] != doc_ids[:, 1 + depth: 1 + depth + n]
    return shifted.masked_fill(crosses, IGNORE_INDEX)


# ---------------------------------------------------------------------- the trainer
class Trainer(ResumableTrainer):
    def __init__(self, cfg: TrainConfig, model_config: ModelConfig | None = None):
        self.cfg = cfg.validate()
        self.dist = dist_utils.init_distributed()
        self.device = resolve_device(cfg.device) if self.dist.world_size == 1 else self.dist.device
        self.run_dir = Path(cfg.out)
        self.is_main = self.dist.is_main
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)

        self.train_loader = PackedLoader(cfg.data, "train", cfg.seq_len, cfg.batch_size, rank=self.dist.rank,
                                         world_size=self.dist.world_size, seed=cfg.seed)
        self.model = self._build_model(model_config)
        self.model_config = self.model.config
        self._check_vocab()
        self.model.train()
        self._apply_indexer_stage()
        self.model = dist_utils.parallelize(self.model, self.dist)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.scheduler = build_scheduler(self.optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                                         schedule=cfg.schedule, decay_fraction=cfg.decay_fraction,
                                         min_lr_ratio=cfg.min_lr_ratio)
        self.balancer = BiasBalancer(self.model, cfg.bias_gamma,
                                     all_reduce=dist_utils.all_reduce_sum if self.dist.world_size > 1 else None)
        self.balancer.hook(self.optimizer)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.is_main)
        self.step = 0
        self.token_bytes = self._token_byte_lengths()
        autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
        self.peak_flops = measure_matmul_peak(autocast_dtype or torch.float32, self.device.type)

    # ----- set-up pieces -----
    def _build_model(self, model_config: ModelConfig | None) -> Transformer:
        cfg = self.cfg
        if cfg.init:
            from dsv32.checkpoint import load_pretrained

            model = load_pretrained(cfg.init, dtype=torch.float32, device=self.device)
            if cfg.aux_alpha is not None:
                model.config.aux_loss_alpha = cfg.aux_alpha
                _set_aux_alpha(model, cfg.aux_alpha)
            return model
        mc = model_config or ModelConfig.preset(cfg.preset)
        vocab = self.train_loader.manifest["tokenizer"]["vocab_size"]
        changes = {"vocab_size": vocab, **cfg.model}
        if cfg.aux_alpha is not None:
            changes["aux_loss_alpha"] = cfg.aux_alpha
        changes["bos_token_id"] = self.train_loader.manifest["tokenizer"].get("bos_id", mc.bos_token_id)
        changes["eos_token_id"] = self.train_loader.manifest["tokenizer"].get("eos_id", mc.eos_token_id)
        mc = mc.replace(**changes).validate()
        torch.manual_seed(cfg.seed)
        return Transformer(mc).to(self.device)

    def _check_vocab(self) -> None:
        data_vocab = self.train_loader.manifest["tokenizer"]["vocab_size"]
        if data_vocab > self.model.config.vocab_size:
            raise ValueError(f"the data's tokenizer has {data_vocab} tokens but the model only "
                             f"{self.model.config.vocab_size}: prepare the data with the model's tokenizer")

    def _apply_indexer_stage(self) -> None:
        stage = self.cfg.indexer_stage
        if stage != "off" and not self.model.config.use_dsa:
            raise ValueError(f"indexer_stage={stage} needs a deepseek_v32 model (this one has no indexer)")
        if stage == "dense_warmup":  # the paper's warm-up: everything frozen but the indexer
            for name, p in self.model.named_parameters():
                p.requires_grad_(".indexer." in name)

    def _token_byte_lengths(self) -> torch.Tensor | None:
        tok_dir = self.cfg.tokenizer or self.train_loader.manifest["tokenizer"].get("path")
        if not tok_dir or not Path(tok_dir).exists():
            return None
        from dsv32.tokenizer import Tokenizer

        return token_byte_lengths(Tokenizer.load(tok_dir), self.model_config.vocab_size)

    # ----- one step -----
    def _forward_losses(self, batch: dict, n_targets: float, n_mtp_targets: float) -> dict:
        cfg = self.cfg
        ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        doc_ids = batch["doc_starts"].to(self.device).cumsum(1)
        positions = batch["position_ids"].to(self.device)
        use_mtp = cfg.mtp_lambda > 0 and self.model_config.num_nextn_predict_layers > 0
        indexer_loss = {"off": None, "dense_warmup": "dense", "sparse": "sparse"}[cfg.indexer_stage]
        depth_labels = [mtp_labels(labels, doc_ids, k) for k in range(self.model_config.num_nextn_predict_layers)] \
            if use_mtp else None
        # the losses come from the model's fused head (`labels=`): no [tokens, vocab] logits are kept
        with self.autocast():
            out = self.model(ids, positions=positions, doc_ids=doc_ids, return_mtp=use_mtp,
                             indexer_loss=indexer_loss, labels=labels, mtp_labels=depth_labels)
        parts = {"lm": out.loss_sum / max(n_targets, 1.0)}
        if use_mtp and out.mtp_loss_sums:
            parts["mtp"] = sum(out.mtp_loss_sums) / max(n_mtp_targets, 1.0) / len(out.mtp_loss_sums)
        if out.aux_loss is not None:
            # a mean over this rank's sequences: weight it by its share of the step's sequences
            parts["balance"] = out.aux_loss / (cfg.grad_accum * self.dist.world_size)
        if out.indexer_loss is not None:
            parts["indexer"] = out.indexer_loss / (cfg.grad_accum * self.dist.world_size)
        self.balancer.accumulate(out.expert_counts)
        return parts

    def _total(self, parts: dict) -> torch.Tensor:
        if self.cfg.indexer_stage == "dense_warmup":
            return parts["indexer"]
        total = parts["lm"] + self.cfg.mtp_lambda * parts.get("mtp", 0.0) + parts.get("balance", 0.0)
        return total + parts.get("indexer", 0.0)

    def train_step(self) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        micro = [next(self.train_loader) for _ in range(cfg.grad_accum)]
        counts = torch.tensor([
            sum(float((b["labels"] != IGNORE_INDEX).sum()) for b in micro),
            sum(float(mtp_labels(b["labels"], b["doc_starts"].cumsum(1), 0).ne(IGNORE_INDEX).sum()) for b in micro),
        ], dtype=torch.float64, device=self.device)
        counts = dist_utils.all_reduce_sum(counts)  # global target counts of this step
        n_targets, n_mtp = float(counts[0]), float(counts[1])
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for batch in micro:
            parts = self._forward_losses(batch, n_targets, n_mtp)
            self._total(parts).backward()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        grad_norm = dist_utils.clip_grad_norm(self.model, cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()  # the pre-step hook applies the balance-bias update first
        self.scheduler.step()
        self.step += 1
        elapsed = time.perf_counter() - started
        tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len * self.dist.world_size
        record = {"step": self.step, "loss": self._reduce_mean(sums.get("lm", 0.0)) + cfg.mtp_lambda * self._reduce_mean(sums.get("mtp", 0.0))
                  + self._reduce_mean(sums.get("balance", 0.0)),
                  "lm_loss": self._reduce_mean(sums.get("lm", 0.0)), "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": tokens / elapsed, "target_tokens": n_targets}
        if "mtp" in sums:
            record["mtp_loss"] = self._reduce_mean(sums["mtp"])
        if "balance" in sums:
            record["balance_loss"] = self._reduce_mean(sums["balance"])
        if "indexer" in sums:
            record["indexer_loss"] = self._reduce_mean(sums["indexer"])
        record["mfu"] = record["tokens_per_s"] * training_flops_per_token(self.model_config, cfg.seq_len) / self.peak_flops
        record.update(self._load_stats())
        return record

    def _reduce_mean(self, value: float) -> float:
        """lm/mtp parts are already global means (summed over ranks); per-rank means are averaged."""
        if self.dist.world_size == 1:
            return value
        return float(dist_utils.all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=self.device))[0])

    def _load_stats(self) -> dict:
        load = self.balancer.last_load
        if load is None:
            return {}
        mean = load.mean(-1).clamp_min(1e-9)
        return {"expert_load_max_over_mean": [round(float(x), 4) for x in load.amax(-1) / mean],
                "starved_experts": int((load == 0).sum()),
                "expert_load": load.to(torch.int64).tolist()}

    # ----- evaluation -----
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss and bits per byte over the first `eval_batches` validation batches."""
        cfg = self.cfg
        try:
            loader = PackedLoader(cfg.data, "validation", cfg.seq_len, cfg.batch_size, rank=self.dist.rank,
                                  world_size=self.dist.world_size, shuffle=False, epochs=1)
        except ValueError:
            return {}  # no validation split large enough for one batch
        self.model.eval()
        totals = loss_totals(self.model, itertools.islice(loader, cfg.eval_batches), self.token_bytes, self.autocast,
                             self.device)
        self.model.train()
        totals = dist_utils.all_reduce_sum(totals)
        return {f"val_{k}": v for k, v in loss_metrics(totals).items()}

    # ----- checkpoints (save_checkpoint / resume: state.ResumableTrainer) -----
    def _extra_state(self) -> dict:
        return {"loader": self.train_loader.state_dict(), "rng_cpu": torch.get_rng_state().tolist(),
                "rng_cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
                "train_config": dataclasses.asdict(self.cfg)}

    def _restore_extra(self, extra: dict) -> None:
        self.train_loader.load_state_dict(extra["loader"])
        torch.set_rng_state(torch.tensor(extra["rng_cpu"], dtype=torch.uint8))
        if extra.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in extra["rng_cuda"]])

    # ----- the run -----
    def write_resolved_config(self) -> None:
        if self.is_main:
            payload = {"train": dataclasses.asdict(self.cfg), "model": self.model_config.to_dict()}
            _write_json(self.run_dir / "config.json", payload)

    def run(self, resume: bool = False) -> dict:
        cfg = self.cfg
        if resume and not self.resume() and self.is_main:
            print(f"no checkpoint in {self.run_dir / 'checkpoints'}: starting from step 0")
        self.write_resolved_config()
        return self.run_steps(cfg.stage, ("loss", "val_loss"),
                              should_log=lambda r: self.step % cfg.log_every == 0 or "val_loss" in r)

    def finish(self) -> Path | None:
        """Export the final weights in the Hugging Face layout with a lineage manifest, and plot."""
        export_dir = self.run_dir / "final"
        model = dist_utils.full_model_copy(self.model)
        if self.is_main:
            from dsv32.checkpoint import save_pretrained

            save_pretrained(model, export_dir, dtype=torch.float32, tokenizer_dir=self._tokenizer_dir())
            _write_json(export_dir / "lineage.json", self._lineage())
            if self.cfg.plot:
                plot_run(self.run_dir)
        dist_utils.barrier()
        return export_dir if self.is_main else None

    def _tokenizer_dir(self) -> str | None:
        tok_dir = self.cfg.tokenizer or self.train_loader.manifest["tokenizer"].get("path")
        return tok_dir if tok_dir and Path(tok_dir).exists() else None

    def _lineage(self) -> dict:
        parent = None
        if self.cfg.init:
            parent_file = Path(self.cfg.init) / "lineage.json"
            parent = json.loads(parent_file.read_text()) if parent_file.exists() else {"path": str(Path(self.cfg.init).resolve())}
        return {"stage": self.cfg.stage, "run_dir": str(self.run_dir.resolve()), "steps": self.step,
                "data": str(Path(self.cfg.data).resolve()),
                "tokenizer_fingerprint": self.train_loader.manifest["tokenizer"]["fingerprint"],
                "init": str(Path(self.cfg.init).resolve()) if self.cfg.init else None, "parent": parent,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _set_aux_alpha(model: Transformer, alpha: float) -> None:
    from dsv32.model.moe import MoE

    for module in model.modules():
        if isinstance(module, MoE):
            module.alpha = alpha


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
