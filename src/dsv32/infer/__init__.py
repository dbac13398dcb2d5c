"""Inference: the paged latent cache, sampling, the continuous-batching engine, MTP speculation, int8."""
from dsv32.infer.engine import Completion, Engine, RequestOutput, Usage
from dsv32.infer.sampling import SamplingParams, TokenLogprob

__all__ = ["Completion", "Engine", "RequestOutput", "SamplingParams", "TokenLogprob", "Usage"]
