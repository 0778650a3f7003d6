# The two commands of the README:
#   make demo   run fastsoup's main job: `fastsoup demo` (AGC + IET training, soup, samples)
#   make test   install everything into .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-demo demo test test-cuda bench clean

# Everything `make test` needs (fastsoup, diffusers, pytest, hypothesis, triton).
install:
	VENV=$(VENV) bash scripts/bootstrap.sh test

# Only what the demo needs: torch (CPU build on machines without an NVIDIA GPU),
# fastsoup and diffusers.
install-demo:
	VENV=$(VENV) bash scripts/bootstrap.sh demo

demo: install-demo
	$(PY) -m fastsoup info
	$(PY) -m fastsoup demo --out fastsoup-demo-out

# The unit tests plus a smoke run of every benchmark (tiny sizes, timing disabled) so the
# benchmarks never rot. One pytest session: one summary line.
test: install
	FASTSOUP_BENCH_SIZE=smoke $(PY) -m pytest -q tests benchmarks --benchmark-disable

test-cuda: install
	$(PY) -m pytest -q -m cuda tests

bench: install
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=.benchmarks/latest.json

clean:
	rm -rf build *.egg-info fastsoup/*.so .pytest_cache
