# The two commands: `make demo` (the main job) and `make test` (the suite). Each sets itself up.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: venv test test-slow test-all demo bench clean

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

demo: venv
	.venv/bin/dsv32 demo

bench: venv
	OMP_NUM_THREADS=2 $(PY) bench/forward.py

clean:
	rm -rf .venv build src/*.egg-info .pytest_cache
