# fedsim: `make demo` and `make test` set up everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_PINS := $(shell grep -E '^(pfl|dp-accounting|prv-accountant|dm-tree|absl-py|wrapt)==' constraints.txt)

.PHONY: demo test install clean

demo: $(STAMP)
	$(BIN)/fedsim run experiments/configs/demo.toml

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
	# The benchmark's pfl runs (and is tested) here. dp-accounting pins attrs<24 but works
	# with the tested attrs 26, so its stack goes in at the pinned versions without the resolver.
	$(BIN)/python -m pip install --quiet --no-deps $(BENCH_PINS)
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
