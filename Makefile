# The two commands: `make demo` (the main job) and `make test` (the suite). Each sets itself up.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: venv test test-slow test-all test-browser demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first and pinned: this version is the CPU build available on this machine
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

test: venv
	OMP_NUM_THREADS=2 $(PY) -m pytest

test-slow: venv
	OMP_NUM_THREADS=2 $(PY) -m pytest -m slow

# everything, slow tests included; lm-eval (for the server's lm-eval test) is installed here, not by `venv`
test-all: venv
	$(PIP) install -q 'lm-eval[api]==0.4.13'
	OMP_NUM_THREADS=2 $(PY) -m pytest -m 'slow or not slow'

# the chat page in real headless Chromium: Debian's package (installed here when missing; needs root), driven by
# Playwright from the [browser] extra, which never downloads a browser of its own. `make test` skips that test
# when either is missing. DSV32_SCREENSHOT=docs/chat-page.png make test-browser refreshes the README's picture.
test-browser: venv
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
	$(PY) -c 'import playwright' 2>/dev/null || $(PIP) install -q -e '.[dev,browser]'
	OMP_NUM_THREADS=2 $(PY) -m pytest -m browser tests/test_browser.py

# the whole pipeline on CPU (tokenizer -> pretrain -> SFT -> GRPO -> eval -> card) in runs/speedrun;
# re-running resumes finished stages (`.venv/bin/dsv32 speedrun --fresh` starts over)
demo: venv
	.venv/bin/dsv32 speedrun --preset tiny

bench: venv
	OMP_NUM_THREADS=2 $(PY) bench/forward.py

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache
