# Two commands do all set-up on a fresh machine with Python 3.11 and make:
#   make demo   create .venv, install (~3 min), run the demo merge (configs/demo.yaml, 7-10 min on 2 idle cores)
#   make test   create .venv, install, run the whole test suite
# and `make demo-full` runs every method and ATM on the demo's tasks at the full budget (configs/demo-full.yaml,
# configs/atm.yaml; 20-27 min).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-full test bench stack-report lock clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mergeflow run configs/demo.yaml

demo-full: install
	$(BIN)/mergeflow run configs/demo-full.yaml
	$(BIN)/mergeflow atm configs/atm.yaml

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/merge_memory.py
	$(BIN)/python benchmarks/engine_speed.py

# The README's fault table and load figures (issue 34): server faults on a real local stack, then 10 runs triggered at
# once on a served deployment (~25-35 min on 2 cores); printed, and kept in benchmarks/out/stack-report.txt.
stack-report: install
	mkdir -p benchmarks/out
	bash -o pipefail -c '{ $(BIN)/python benchmarks/stack_faults.py && \
	  $(BIN)/python benchmarks/stack_load.py --runs 10 --limit 3; } 2>&1 | tee benchmarks/out/stack-report.txt'

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' > requirements.lock.new
	{ echo "# Full lock (pip freeze of a working CPU environment, Python 3.11). Regenerate with: make lock"; \
	  cat requirements.lock.new; } > requirements.lock && rm requirements.lock.new

clean:
	rm -rf $(VENV) .pytest_cache
