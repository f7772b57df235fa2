# fedsim: `make demo` and `make test` set up everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CI also installs the optional extras, so the tests of the benchmark's competitors and
# of the metric sinks run there instead of skipping.
CI_EXTRAS := bench,tensorboard,wandb,mlflow

.PHONY: demo test install extras bench clean

demo: $(STAMP)
	$(BIN)/fedsim demo

test: $(STAMP)
	$(BIN)/python -m pytest

install: $(STAMP)

# torch goes in first, alone: constraints.txt pins the CPU build, and letting the
# resolver pick torch for another package could pull several GB of CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The headline benchmark (about 20 min on 2 cores), with its competitors installed.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,bench]"
	$(BIN)/python experiments/bench/engines.py

extras: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,$(CI_EXTRAS)]"

clean:
	rm -rf $(VENV) runs
