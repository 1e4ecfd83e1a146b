# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
AN4_ROOT ?= data/an4
export AN4_ROOT
STAMP := $(VENV)/.installed

.PHONY: demo test test-all faults bench install clean screenshots docs

# The stamp is newer than pyproject.toml once the install has succeeded, so a second run installs nothing.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: dense Conformer-CTC on AN4, CSP to 70% sparsity, fine-tuning, WER + sparsity + checkpoint size.
# The headline: one dense Conformer-CTC, then CSP and magnitude pruning to 70% from it, side by side on the
# same fine-tuning budget (2 epochs, the tuned LR 1e-3 with 30 warm-up steps), two jobs in parallel.
DEMO_PRUNE := "prune.sparsity=choice(0.7)" "prune.finetune_epochs=choice(2)" "prune.finetune_lr=choice(1e-3)" \
	"prune.finetune_warmup_steps=choice(30)"
demo: $(STAMP)
	$(VPY) recipes/asr/run.py trainer=demo hydra.run.dir=outputs/demo/dense
	$(VPY) recipes/asr/run.py -m hydra/launcher=local_parallel +prune=csp,magnitude $(DEMO_PRUNE) trainer.threads=1 \
		init_from=outputs/demo/dense/dense.pt hydra.sweep.dir=outputs/demo/sweep
	$(VPY) -m csprune.cli report outputs/demo/sweep

test: $(STAMP)
	$(VPY) -m pytest -q

# The fault suite alone, ending with its table (fault, trials, detected, silently wrong, work lost); also part of `make test`.
faults: $(STAMP)
	$(VPY) -m pytest -q -m faults

test-all: $(STAMP)
	$(VPY) -m pytest -q -m ''

bench: $(STAMP)
	$(VPY) bench/support_error.py
	$(VPY) bench/solvers.py
	$(VPY) bench/overhead.py
	$(VPY) bench/export.py
	OMP_NUM_THREADS=1 $(VPY) bench/deploy.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache docs/api

# API reference from the docstrings (Google style) into docs/api/; docs/design.md is the design itself.
# pdoc follows a package's submodules only as far as its __all__ names them, so every public module it
# would not reach from `csprune` is named here (private `_*` modules are left out).
DOC_MODULES = $(shell $(VPY) -c 'import importlib, pkgutil, csprune; print(*[m.name for m in pkgutil.walk_packages(csprune.__path__, "csprune.") if not (n := m.name.rpartition(".")[2]).startswith("_") and n not in getattr(importlib.import_module(m.name.rpartition(".")[0]), "__all__", [n])])')

docs: $(STAMP)
	rm -rf docs/api
	$(VPY) -m pdoc --docformat google -o docs/api csprune $(DOC_MODULES)

# Screenshots for the README from a real run and sweep: make screenshots RUN=outputs/asr/<run> SWEEP=multirun/asr/<date>/<time>
screenshots: $(STAMP)
	PY=$(VPY) scripts/screenshots.sh $(RUN) $(SWEEP)
