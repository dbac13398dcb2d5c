"""The DeepSeek-V3 / V3.2 decoder: blocks, multi-token prediction, and the full model.

Parameter names follow the Hugging Face checkpoint (minus the `model.` prefix), so the checkpoint
module maps keys one to one; the only structural differences are the stacked routed experts and the
MTP layers, which live in `mtp` instead of at `layers.{num_hidden_layers + k}`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model.cache import LatentCache
from dsv32.model.layers import MLP, Linear, RMSNorm
from dsv32.model.loss import linear_cross_entropy
from dsv32.model.mla import MLA, AttentionContext
from dsv32.model.moe import MoE
from dsv32.model.rope import RotaryEmbedding

# above this many query tokens the expanded path is cheaper than the absorbed one over a cache
ABSORB_MAX_QUERY_TOKENS = 128


@dataclass
class ModelOutput:
    logits: torch.Tensor | None                            # [batch, seq, vocab] (or the kept tail); None with labels
    aux_loss: torch.Tensor | None = None                   # sequence-wise balance loss, summed over layers
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [batch, seq-1-k, vocab], predicts t+2+k
    expert_counts: torch.Tensor | None = None              # [n_moe_layers (+ MTP), n_experts] tokens per expert
    expert_indices: list[torch.Tensor] = field(default_factory=list)  # per MoE layer [batch, seq, top_k]
    indexer_loss: torch.Tensor | None = None               # mean KL of the DSA indexers, when asked
    hidden_states: torch.Tensor | None = None              # final-normed hidden [batch, seq, hidden]
    loss_sum: torch.Tensor | None = None                   # with labels: summed cross-entropy of the main head (fp32)
    mtp_loss_sums: list[torch.Tensor] = field(default_factory=list)  # with mtp_labels: the same per MTP depth


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, ctx: AttentionContext, cache=None, forced_indices=None):
        h = h + self.self_attn(self.input_layernorm(h), ctx, cache)
        stats = None
        if isinstance(self.mlp, MoE):
            ffn_out, stats = self.mlp(self.post_attention_layernorm(h), forced_indices)
        else:
            ffn_out = self.mlp(self.post_attention_layernorm(h))
        return h + ffn_out, stats


class SharedHead(nn.Module):
    """The MTP module's own final norm; the output head itself is shared with the main model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    """One multi-token-prediction depth: combine the previous depth's hidden state with the embedding
    of the next token (embedding first: eh_proj([enorm(emb); hnorm(h)])), then a full decoder layer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev, next_embeds, ctx: AttentionContext, cache=None, forced_indices=None):
        h = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(h_prev)), dim=-1))
        return super().forward(h, ctx, cache, forced_indices)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    # ------------------------------------------------------------------ init and switches
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norm gains, zeros for biases."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    def set_indexer_numerics(self, mode: str) -> None:
        """"exact" (fp32 reference formula) or "fp8" (the official Hadamard + FP8 deployment numerics)."""
        if mode not in ("exact", "fp8"):
            raise ValueError(f"indexer numerics must be 'exact' or 'fp8', not {mode!r}")
        for module in self.modules():
            if hasattr(module, "simulate_fp8"):
                module.simulate_fp8 = mode == "fp8"

    def set_moe_reference(self, enabled: bool) -> None:
        """Route experts through the plain loop reference instead of the grouped path."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.use_loop_reference = enabled

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        dtype = dtype or self.embed_tokens.weight.dtype
        return LatentCache(self.config, batch, max_len, dtype=dtype, device=self.embed_tokens.weight.device)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        start_pos: int = 0,
        cache: LatentCache | None = None,
        doc_ids: torch.Tensor | None = None,
        return_mtp: bool = False,
        indexer_loss: str | None = None,
        attn_impl: str | None = None,
        logits_to_keep: int = 0,
        forced_routing: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        mtp_labels: list[torch.Tensor] | None = None,
    ) -> ModelOutput:
        """Causal forward over input_ids [batch, seq].

        positions: absolute positions [batch, seq] (default start_pos + arange); with a `cache`, the new
        tokens are written at these positions and attend to everything cached before them.
        doc_ids: [batch, seq] document number of each token of a packed row; attention stays inside a
        document (no cache). indexer_loss: "dense" (warm-up: dense attention, KL over all causal keys) or
        "sparse" (top-k attention, KL over the selected keys). attn_impl: "expanded" | "absorbed"
        (default: absorbed for short query blocks over a cache). logits_to_keep: >0 keeps only the last
        positions' logits. forced_routing: per MoE layer expert indices [batch, seq, top_k] to replay.
        labels: [batch, seq] targets of the main head (-100: none); then `loss_sum` is their summed
        cross-entropy, computed chunk by chunk without materialising the logits (`logits` is None).
        mtp_labels: with return_mtp, the targets of each MTP depth k [batch, seq-1-k]; then `mtp_loss_sums`
        holds their summed cross-entropies the same way (`mtp_logits` stays empty).
        """
        cfg = self.config
        self._check_ids(input_ids)
        if indexer_loss not in (None, "dense", "sparse"):
            raise ValueError(f"indexer_loss must be None, 'dense' or 'sparse', not {indexer_loss!r}")
        if indexer_loss and not cfg.use_dsa:
            raise ValueError("indexer_loss needs a deepseek_v32 config (this model has no indexer)")
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed documents) cannot be combined with a cache")
        batch, seq = input_ids.shape
        device = input_ids.device
        if positions is None:
            positions = (torch.arange(seq, device=device) + start_pos).expand(batch, seq)
        if attn_impl is None:
            attn_impl = "absorbed" if cache is not None and seq <= ABSORB_MAX_QUERY_TOKENS else "expanded"
        elif attn_impl not in ("expanded", "absorbed"):
            raise ValueError(f"attn_impl must be 'expanded' or 'absorbed', not {attn_impl!r}")

        ctx = self._context(positions, cache, doc_ids, attn_impl, indexer_loss)
        h = self.embed_tokens(input_ids)
        moe_stats, idx_losses = [], []
        forced = iter(forced_routing) if forced_routing is not None else None
        for layer in self.layers:
            forced_i = next(forced) if forced is not None and isinstance(layer.mlp, MoE) else None
            h, stats = layer(h, ctx, cache.layer(layer.layer_idx) if cache is not None else None, forced_i)
            moe_stats.append(stats)
            idx_losses.append(layer.self_attn.last_indexer_loss)
            layer.self_attn.last_indexer_loss = None
        hidden = self.norm(h)

        mtp_logits, mtp_loss_sums = [], []
        if mtp_labels is not None and len(mtp_labels) < len(self.mtp):
            raise ValueError(f"mtp_labels has {len(mtp_labels)} depths, the model {len(self.mtp)}")
        if return_mtp and self.mtp and seq > 1:
            h_prev = hidden
            for k, mtp in enumerate(self.mtp):
                n = seq - 1 - k
                if n <= 0:
                    break
                sub_ctx = self._context(positions[:, :n], None, doc_ids[:, :n] if doc_ids is not None else None,
                                        "expanded", indexer_loss)
                next_embeds = self.embed_tokens(input_ids[:, 1 + k:])
                h_prev, stats = mtp(h_prev[:, :n], next_embeds, sub_ctx)
                moe_stats.append(stats)
                idx_losses.append(mtp.self_attn.last_indexer_loss)
                mtp.self_attn.last_indexer_loss = None
                mtp_hidden = mtp.shared_head.norm(h_prev)
                if mtp_labels is not None:
                    mtp_loss_sums.append(linear_cross_entropy(mtp_hidden, self.lm_head.weight, mtp_labels[k]))
                else:
                    mtp_logits.append(self.lm_head(mtp_hidden))

        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            logits, loss_sum = None, linear_cross_entropy(hidden, self.lm_head.weight, labels)
        else:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
            logits, loss_sum = self.lm_head(kept), None
        stats = [s for s in moe_stats if s is not None]
        aux = [s.aux_loss for s in stats if s.aux_loss is not None]
        losses = [l for l in idx_losses if l is not None]
        return ModelOutput(
            logits=logits,
            aux_loss=torch.stack(aux).sum() if aux else None,
            mtp_logits=mtp_logits,
            expert_counts=torch.stack([s.counts for s in stats]) if stats else None,
            expert_indices=[s.indices for s in stats],
            indexer_loss=torch.stack(losses).mean() if losses else None,
            hidden_states=hidden,
            loss_sum=loss_sum,
            mtp_loss_sums=mtp_loss_sums,
        )

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def _context(self, positions, cache, doc_ids, impl, indexer_loss) -> AttentionContext:
        cos, sin = self.rotary(positions)
        allowed = None
        if cache is not None:
            n_keys = int(positions.max()) + 1
            key_pos = torch.arange(n_keys, device=positions.device)
            allowed = key_pos[None, None, :] <= positions[:, :, None]            # [batch, seq, n_keys]
        elif doc_ids is not None:
            seq = positions.shape[1]
            causal = torch.ones(seq, seq, dtype=torch.bool, device=positions.device).tril()
            allowed = causal[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])
        return AttentionContext(cos=cos, sin=sin, positions=positions, allowed=allowed, impl=impl,
                                indexer_loss=indexer_loss)
