"""lm-evaluation-harness against the server, unchanged: `lm_eval --model local-completions` with
`tokenizer_backend=remote` (our /tokenizer_info, /tokenize, /detokenize) runs a multiple-choice
loglikelihood task from a local task file (no hub access) against `dsv32 serve`.

The model is a nano model trained here for a few seconds on counting digit strings ("Count: 4567..."),
so the task (pick the digit that comes next) is solvable: accuracy must be far above chance (0.25). A
server that returned logprobs for generated tokens only (no echo) would score chance.

Slow (installing lm-eval and training the model take a while): run with `make test-all`.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dsv32 import ModelConfig, Transformer
from dsv32.checkpoint import save_pretrained
from serve_common import ServerProcess, small_tokenizer

pytestmark = pytest.mark.slow
DIGITS = "0123456789"


def counting(start: int, n: int) -> str:
    return "".join(DIGITS[(start + i) % 10] for i in range(n))


def train_counting_model(out_dir: str, steps: int = 80) -> None:
    """Digits tokenize one per token; the model learns that each digit is followed by the next one."""
    tok = small_tokenizer()
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("nano"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = random.Random(0)
    for _ in range(steps):
        ids = torch.tensor([tok.encode("Count: " + counting(rng.randrange(10), 24)) for _ in range(8)])
        loss = F.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_pretrained(model.eval(), out_dir)
    tok.save(out_dir)


def write_task(task_dir) -> None:
    rng = random.Random(1)
    docs = []
    for k in range(20):
        start, length = k % 10, 3 + k // 10
        right = DIGITS[(start + length) % 10]
        choices = [right, *rng.sample([d for d in DIGITS if d != right], 3)]
        rng.shuffle(choices)
        docs.append({"context": "Count: " + counting(start, length), "choices": choices, "label": choices.index(right)})
    data = os.path.join(task_dir, "counting.jsonl")
    with open(data, "w") as f:
        f.write("\n".join(json.dumps(d) for d in docs) + "\n")
    with open(os.path.join(task_dir, "dsv32_counting.yaml"), "w") as f:
        f.write(f"""task: dsv32_counting
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def test_lm_eval_loglikelihood_task(tmp_path):
    pytest.importorskip("lm_eval")
    model_dir = str(tmp_path / "counting")
    train_counting_model(model_dir)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    write_task(str(task_dir))
    srv = ServerProcess(model_dir, "--served-model-name", "counting", "--max-seq-len", "256")
    try:
        out = tmp_path / "results"
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_HOME=str(tmp_path / "hf"))
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
               "--model_args", f"model=counting,base_url={srv.url}/v1/completions,tokenizer_backend=remote,"
                               "num_concurrent=4,max_retries=1,max_length=256",
               "--tasks", "dsv32_counting", "--include_path", str(task_dir), "--output_path", str(out)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        results = [p for p in out.rglob("results*.json")]
        assert results, run.stdout[-2000:]
        acc = json.loads(results[0].read_text())["results"]["dsv32_counting"]["acc,none"]
        assert acc >= 0.8, (acc, run.stdout[-2000:])
    finally:
        assert srv.stop() == 0
