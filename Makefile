# The two commands of the README:
#   make demo   run fastsoup's main job (environment report + a tiny training step)
#   make test   install everything into .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-cuda bench clean

install:
	VENV=$(VENV) bash scripts/bootstrap.sh

demo: install
	$(PY) -m fastsoup info
	$(PY) examples/tiny_train_step.py

test: install
	$(PY) -m pytest -q tests

test-cuda: install
	$(PY) -m pytest -q -m cuda tests

bench: install
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build *.egg-info fastsoup/*.so .pytest_cache
