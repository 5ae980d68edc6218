# Every target makes or refreshes the local virtual environment by itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ksm-proto run $(ARGS)

# the suite on TEST_JOBS processes (pytest-xdist); the tests that use the kernel's KSM run one at a time
# (tests/conftest.py). TEST_JOBS=0: in this process, as before.
TEST_JOBS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/ksm-proto bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
