"""`dsv32 generate` and `dsv32 chat` (registered by dsv32.cli).

- `generate --model DIR --prompt TEXT`: one completion, streamed to stdout. The prompt is sent as a user
  turn of the V3.2 chat template (`--thinking` for thinking mode) unless `--raw` asks for a plain
  continuation. Reasoning is shown dimmed on a terminal; when stdout is not a terminal it goes to
  stderr, so `> file` captures just the answer.
- `chat --model DIR`: an interactive conversation with history. Commands: /think (toggle thinking),
  /reset, /stats, /help, /exit. Ctrl-C stops a reply in progress; Ctrl-C at the prompt or Ctrl-D exits.
- `plan` (dsv32.infer.plan): per-GPU weights and KV-cache capacity of a multi-GPU deployment.

Both run one engine across ranks under `torchrun --nproc_per_node N -m dsv32.cli generate ...`
(dsv32.infer.launch; rank 0 prints, the others follow it).
"""
from __future__ import annotations

import argparse
import sys
import time

from dsv32.cli import CLIError
from dsv32.infer.launch import DEFAULT_MAX_SEQ_LEN

DIM, RESET = "\x1b[2m", "\x1b[0m"
COMPILE_HELP = "torch.compile the decode of a lone request (faster on CPU; the first one compiles for seconds)"


# ---------------------------------------------------------------------- shared setup
def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the checkpoint directory)")
    p.add_argument("--dtype", default="fp32", help="weights dtype: fp32 (default) or bf16")
    p.add_argument("--int8", action="store_true", help="weight-only int8 (per-channel) for faster CPU decoding")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (needs the MTP layer)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"context limit (default: min(model limit, {DEFAULT_MAX_SEQ_LEN}))")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")


def _add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling (defaults: the V3.2 release's temperature 1.0, top_p 0.95)")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def sampling_params(args, skip_special: bool):
    from dsv32.infer.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=list(args.stop),
        skip_special_tokens=skip_special,
    )


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """Flags of scale-out runs (`torchrun --nproc_per_node N -m dsv32.cli ...`); see dsv32.infer.parallel."""
    g = p.add_argument_group("scale-out (under torchrun)")
    g.add_argument("--expert-load", metavar="FILE",
                   help="recorded expert load (engine stats JSON or a saved /metrics page): place the routed "
                        "experts on the ranks to balance it (EPLB)")
    g.add_argument("--redundant-experts", type=int, default=0,
                   help="extra copies of the hottest experts per MoE layer with --expert-load (default 0)")


def engine_options(args) -> dict:
    """The `parallel_engine` keywords the shared model flags ask for."""
    return dict(tokenizer_dir=args.tokenizer, dtype=args.dtype, int8=args.int8, speculative=args.speculative,
                compile=args.compile, max_seq_len=args.max_seq_len, threads=args.threads, expert_load=args.expert_load,
                redundant_experts=args.redundant_experts, log=lambda line: print(line, file=sys.stderr))


def build_engine(args):
    """Load the checkpoint and tokenizer named by the flags, in this process or across the torchrun job.

    A context manager yielding (engine, tokenizer); engine is None on follower ranks (see dsv32.infer.launch).
    """
    from dsv32.infer.launch import parallel_engine

    return parallel_engine(args.model, max_batch=1, **engine_options(args))


class _Printer:
    """Writes reasoning and content deltas; reasoning dimmed on a terminal, or to a side stream."""

    def __init__(self, out, color: bool, reasoning_out=None):
        self.out, self.color = out, color
        self.reasoning_out = reasoning_out or out
        self.channel = None

    def write(self, channel: str, text: str) -> None:
        if not text:
            return
        stream = self.reasoning_out if channel == "reasoning" else self.out
        if channel != self.channel:
            if self.channel == "reasoning":
                if self.color:
                    self.reasoning_out.write(RESET)
                # a gap between the reasoning and the answer when they share a stream, else end its line
                self.reasoning_out.write("\n\n" if self.out is self.reasoning_out else "\n")
                self.reasoning_out.flush()
            if self.color and channel == "reasoning":
                stream.write(DIM)
            self.channel = channel
        stream.write(text)
        stream.flush()

    def end(self) -> None:
        if self.color and self.channel == "reasoning":
            self.reasoning_out.write(RESET)
        self.channel = None


def stream_reply(engine, prompt_ids: list[int], params, printer: _Printer | None, thinking_mode: str | None):
    """Run one request, printing as it goes; returns (assistant message or raw text, finish reason, usage, seconds)."""
    from dsv32.chat import StreamParser, assemble_deltas

    parser = StreamParser(thinking_mode) if thinking_mode else None
    deltas, raw, finish, usage = [], [], None, None
    t0 = time.perf_counter()

    def show(items):
        for d in items:
            deltas.append(d)
            if printer is None:
                continue
            if "reasoning_content" in d:
                printer.write("reasoning", d["reasoning_content"])
            if "content" in d:
                printer.write("content", d["content"])
            for call in d.get("tool_calls") or []:
                fn = call["function"]
                printer.write("content", f"\n[tool call] {fn['name']}({fn['arguments']})\n")

    for out in engine.generate(prompt_ids, params):
        raw.append(out.text)
        if parser is not None:
            show(parser.feed(out.text))
        elif printer is not None:
            printer.write("content", out.text)
        if out.finished:
            finish, usage = out.finish_reason, out.usage
    if parser is not None:
        show(parser.finish())
    if printer is not None:
        printer.end()
    seconds = time.perf_counter() - t0
    message = assemble_deltas(deltas) if parser is not None else "".join(raw)
    return message, finish, usage, seconds


def _stats_line(usage, seconds: float, engine) -> str:
    rate = usage.completion_tokens / seconds if seconds > 0 else 0.0
    line = (f"[{usage.prompt_tokens} prompt tokens ({usage.cached_tokens} cached), {usage.completion_tokens} generated, "
            f"{rate:.1f} tokens/s")
    if engine.speculative:
        line += f", MTP acceptance {engine.spec_stats.acceptance_rate:.0%}"
    return line + "]"


# ---------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise CLIError("the prompt is empty")
    if args.samples < 1:
        raise CLIError(f"--samples must be at least 1, got {args.samples}")
    with build_engine(args) as (engine, tokenizer):
        if engine is None:  # a follower rank: it ran rank 0's forwards
            return 0
        return _generate(args, prompt, engine, tokenizer)


def _generate(args, prompt: str, engine, tokenizer) -> int:
    if args.raw:
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        thinking_mode = None
    else:
        from dsv32.chat import tokenize_messages

        thinking_mode = "thinking" if args.thinking else "chat"
        ids = tokenize_messages([{"role": "user", "content": prompt}], tokenizer, thinking_mode=thinking_mode)
    params = sampling_params(args, skip_special=args.raw)
    if args.samples > 1:
        return _generate_samples(args, prompt, engine, tokenizer, params)
    tty = sys.stdout.isatty()
    color = tty and not args.no_color
    printer = _Printer(sys.stdout, color, reasoning_out=None if tty else sys.stderr)
    _, finish, usage, seconds = stream_reply(engine, ids, params, printer, thinking_mode)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        print(_stats_line(usage, seconds, engine) + f" finish: {finish}", file=sys.stderr)
    return 0


def _generate_samples(args, prompt: str, engine, tokenizer, params) -> int:
    """--samples K: K sampled replies, then the majority answer (self-consistency) or the best-of-K by a
    verifier; the chosen reply goes to stdout, the votes and the other pick to stderr."""
    from dsv32.train.ttc import sample_and_vote

    if args.raw:
        raise CLIError("--samples votes over chat replies; it cannot be combined with --raw")
    if params.temperature == 0:
        raise CLIError("--samples needs sampling (temperature > 0): greedy replies would all be the same")
    thinking_mode = "thinking" if args.thinking else "chat"
    result = sample_and_vote(engine, tokenizer, [{"role": "user", "content": prompt}], args.samples, params,
                             thinking_mode=thinking_mode, verifier=args.verifier)
    if args.select == "majority":
        reply, label = result["reply"], f"majority answer {result['answer']!r}"
    else:
        reply, label = result["best_reply"], f"best of {args.samples} by the {args.verifier} verifier: {result['best_answer']!r}"
    reply = reply or {}
    if reply.get("reasoning_content"):
        print(reply["reasoning_content"], file=sys.stderr)
    print(reply.get("content") or "")
    print(f"{label}; votes {result['votes']}; majority {result['answer']!r}, best-of-{args.samples} "
          f"{result['best_answer']!r}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- chat
HELP = "/think toggles thinking mode, /reset clears the history, /stats shows counters, /exit quits (or Ctrl-D)"


class ChatSession:
    """The chat loop, driven by a line reader so tests can feed it lines."""

    def __init__(self, engine, tokenizer, params, thinking: bool = False, out=None, color: bool = False):
        self.engine, self.tokenizer, self.params = engine, tokenizer, params
        self.thinking = thinking
        self.out = out or sys.stdout
        self.color = color
        self.history: list[dict] = []

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self, read_line=input) -> int:
        self.say(f"dsv32 chat ({'thinking' if self.thinking else 'chat'} mode). {HELP}")
        while True:
            try:
                line = read_line("\n> ")
            except EOFError:  # Ctrl-D
                self.say("")
                return 0
            except KeyboardInterrupt:  # Ctrl-C at the prompt
                self.say("")
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if self.command(text):
                    return 0
                continue
            self.reply(text)

    def command(self, text: str) -> bool:
        """Handle a /command; True means exit."""
        name = text.split()[0].lower()
        if name in ("/exit", "/quit"):
            return True
        if name == "/reset":
            self.history.clear()
            self.say("(history cleared)")
        elif name == "/think":
            self.thinking = not self.thinking
            self.say(f"(thinking {'on' if self.thinking else 'off'})")
        elif name == "/stats":
            s = self.engine.stats()
            self.say(f"(turns {len(self.history) // 2}, prompt tokens {s['prompt_tokens']} of which cached "
                     f"{s['cached_prompt_tokens']}, generated {s['generated_tokens']})")
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"(unknown command {name}; {HELP})")
        return False

    def reply(self, user_text: str) -> dict | None:
        from dsv32.chat import tokenize_messages

        mode = "thinking" if self.thinking else "chat"
        messages = self.history + [{"role": "user", "content": user_text}]
        ids = tokenize_messages(messages, self.tokenizer, thinking_mode=mode)
        if len(ids) >= self.engine.max_seq_len:
            self.say(f"(the conversation is {len(ids)} tokens, over the {self.engine.max_seq_len}-token limit: /reset)")
            return None
        printer = _Printer(self.out, self.color)
        try:
            message, finish, usage, _ = stream_reply(self.engine, ids, self.params, printer, mode)
        except KeyboardInterrupt:  # Ctrl-C while generating: drop this exchange, keep chatting
            printer.end()
            self.say("\n(interrupted)")
            return None
        self.out.write("\n")
        if finish == "length":
            self.say("(reply cut at the token limit)")
        assistant = {"role": "assistant", "content": message["content"],
                     "reasoning_content": message["reasoning_content"] or None}
        if message.get("tool_calls"):
            assistant["tool_calls"] = message["tool_calls"]
        self.history += [{"role": "user", "content": user_text}, assistant]
        return assistant


def cmd_chat(args) -> int:
    with build_engine(args) as (engine, tokenizer):
        if engine is None:  # a follower rank: it ran rank 0's forwards
            return 0
        params = sampling_params(args, skip_special=False)
        color = sys.stdout.isatty() and not args.no_color
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        return ChatSession(engine, tokenizer, params, thinking=args.thinking, color=color).run()


# ---------------------------------------------------------------------- wiring
def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion from a checkpoint, streamed to stdout",
                       description="Generate one completion, streamed to stdout. The prompt becomes a user turn of "
                                   "the V3.2 chat template unless --raw.")
    _add_model_flags(p)
    add_parallel_flags(p)
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--thinking", action="store_true", help="thinking mode (the reply starts with reasoning)")
    p.add_argument("--raw", action="store_true", help="plain continuation of the text, no chat template")
    p.add_argument("--no-color", action="store_true", help="no dimming of the reasoning")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    g = p.add_argument_group("test-time compute")
    g.add_argument("--samples", type=int, default=1, metavar="K",
                   help="sample K replies and answer with the majority vote or the best-of-K (default 1)")
    g.add_argument("--select", choices=("majority", "best"), default="majority",
                   help="which of the K replies to print: the majority answer's (default) or the verifier's best")
    g.add_argument("--verifier", choices=("steps", "logprob"), default="steps",
                   help="best-of-K score: steps re-checks the arithmetic written in the reply (ties: mean "
                        "log-prob); logprob is the mean token log-prob")
    _add_sampling_flags(p, max_tokens=256)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with a checkpoint",
                       description=f"Interactive chat with history. {HELP}. Ctrl-C stops a reply; Ctrl-C at the "
                                   "prompt or Ctrl-D exits.")
    _add_model_flags(p)
    add_parallel_flags(p)
    p.add_argument("--thinking", action="store_true", help="start in thinking mode (toggle with /think)")
    p.add_argument("--no-color", action="store_true", help="no dimming of the reasoning")
    _add_sampling_flags(p, max_tokens=1024)
    p.set_defaults(func=cmd_chat)

    from dsv32.infer import plan

    plan.add_command(sub)
