"""Prometheus metrics (text exposition format 0.0.4), written by hand: counters, gauges, histograms.

Request-level series (tokens, latencies, finish reasons) are recorded by the HTTP layer as clients
see them: a constrained generation that the server runs as several engine requests counts once.
Engine-level series (running/waiting, cache occupancy, prefix-cache hits, speculation, expert load)
come from a snapshot of `Engine.stats()` taken between two steps when /metrics is scraped.
"""
from __future__ import annotations

import math
import threading

PREFIX = "dsv32:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += times
                break
        self.sum += value * times
        self.count += times

    def lines(self, name: str, labels: dict) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f"{name}_bucket{_labels({**labels, 'le': _num(float(bound))})} {cumulative}")
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """Request-level counters and latency histograms; thread-safe."""

    def __init__(self, model_name: str, moe_layers: list[int] | None = None):
        self.model_name = model_name
        self.moe_layers = list(moe_layers or [])  # model layer index of each MoE layer (for labels)
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_total = 0
        self.finished: dict[str, int] = {}
        self.errors: dict[int, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.step_tokens = Histogram(STEP_TOKEN_BUCKETS)
        self.step_time = Histogram(ITL_BUCKETS)

    # ----- recording
    def on_request(self, prompt_tokens: int) -> None:
        with self._lock:
            self.requests_total += 1
            self.prompt_tokens += prompt_tokens

    def on_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def on_tokens(self, n: int, since_last: float | None) -> None:
        """n new tokens; since_last: seconds since the previous tokens of this generation (None: first)."""
        with self._lock:
            self.generation_tokens += n
            if since_last is not None and n:
                self.itl.observe(since_last / n, n)

    def on_finished(self, reason: str | None, seconds: float) -> None:
        with self._lock:
            key = reason or "unknown"
            self.finished[key] = self.finished.get(key, 0) + 1
            self.e2e.observe(seconds)

    def on_error(self, status: int) -> None:
        with self._lock:
            self.errors[status] = self.errors.get(status, 0) + 1

    def on_step(self, seconds: float, tokens: int) -> None:
        with self._lock:
            self.step_time.observe(seconds)
            if tokens:
                self.step_tokens.observe(tokens)

    # ----- exposition
    def render(self, engine_stats: dict | None, pending: int = 0) -> str:
        base = {"model_name": self.model_name}
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]):
            full = PREFIX + name
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} {kind}")
            for labels, value in samples:
                lines.append(f"{full}{_labels({**base, **labels})} {_num(value)}")

        def histogram(name: str, help_text: str, hist: Histogram):
            full = PREFIX + name
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} histogram")
            lines.extend(hist.lines(full, base))

        stats = engine_stats or {}
        with self._lock:
            family("num_requests_running", "gauge", "Requests in the engine's running batch.",
                   [({}, stats.get("running", 0))])
            family("num_requests_waiting", "gauge", "Requests queued in the engine, waiting for a batch slot.",
                   [({}, stats.get("waiting", 0))])
            family("num_requests_in_flight", "gauge", "Generations admitted by the HTTP layer and not finished.",
                   [({}, pending)])
            total = stats.get("cache_blocks_total", 0)
            used = stats.get("cache_blocks_used", 0)
            family("kv_cache_usage_perc", "gauge", "Fraction of latent-cache blocks in use (1 = full).",
                   [({}, used / total if total else 0.0)])
            family("kv_cache_blocks_used", "gauge", "Latent-cache blocks in use.", [({}, used)])
            family("kv_cache_blocks_total", "gauge", "Latent-cache blocks available to requests.", [({}, total)])
            family("kv_cache_blocks_cached", "gauge", "Free blocks that still hold a reusable prompt prefix.",
                   [({}, stats.get("cache_blocks_cached", 0))])
            family("prompt_tokens_total", "counter", "Prompt tokens of the requests served.",
                   [({}, self.prompt_tokens)])
            family("generation_tokens_total", "counter", "Tokens generated for the requests served.",
                   [({}, self.generation_tokens)])
            family("request_success_total", "counter", "Finished requests by finish reason.",
                   [({"finished_reason": k}, v) for k, v in sorted(self.finished.items())] or [({"finished_reason": "stop"}, 0)])
            family("request_errors_total", "counter", "Requests answered with an error, by HTTP status.",
                   [({"status": str(k)}, v) for k, v in sorted(self.errors.items())] or [({"status": "400"}, 0)])
            histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.", self.ttft)
            histogram("inter_token_latency_seconds", "Time between successive generated tokens.", self.itl)
            histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", self.e2e)
            histogram("iteration_tokens_total", "Tokens produced by one engine step (all requests together).",
                      self.step_tokens)
            histogram("engine_step_seconds", "Duration of one engine step.", self.step_time)
        family("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache (engine requests).",
               [({}, stats.get("prompt_tokens", 0))])
        family("prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.",
               [({}, stats.get("cached_prompt_tokens", 0))])
        family("num_preemptions_total", "counter", "Requests preempted because the cache ran out of blocks.",
               [({}, stats.get("preemptions", 0))])
        spec = stats.get("speculative") or {}
        family("spec_decode_num_draft_tokens_total", "counter", "MTP draft tokens verified.",
               [({}, spec.get("drafted", 0))])
        family("spec_decode_num_accepted_tokens_total", "counter", "MTP draft tokens accepted.",
               [({}, spec.get("accepted", 0))])
        family("spec_decode_acceptance_rate", "gauge", "Accepted / drafted MTP tokens (0 when speculation is off).",
               [({}, spec.get("acceptance_rate", 0.0))])
        family("spec_decode_tokens_per_step", "gauge", "Mean tokens emitted per verification step.",
               [({}, spec.get("tokens_per_step", 0.0))])
        load = stats.get("expert_load") or {}

        def layer(i: int) -> str:
            return str(self.moe_layers[i]) if i < len(self.moe_layers) else str(i)

        per_expert = load.get("tokens_per_expert") or []
        family("expert_tokens_total", "counter", "Tokens routed to each routed expert, per MoE layer (serving traffic).",
               [({"layer": layer(i), "expert": str(j)}, n) for i, row in enumerate(per_expert) for j, n in enumerate(row)])
        family("starved_experts", "gauge", "Routed experts of a MoE layer that have received no token yet.",
               [({"layer": layer(i)}, len(s)) for i, s in enumerate(load.get("starved_experts") or [])])
        family("expert_load_max_over_mean", "gauge", "Most-loaded expert's tokens over the mean, per MoE layer.",
               [({"layer": layer(i)}, v) for i, v in enumerate(load.get("max_over_mean") or [])])
        return "\n".join(lines) + "\n"
