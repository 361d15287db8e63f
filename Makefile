# The README's two commands: `make demo` (the product on the built-in benchmark) and `make test`.
# Both create the virtual environment themselves on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data/emoji
RUNS ?= runs/emoji
SEEDS ?= 0 1 2

.PHONY: demo test test-slow lint browser bench-accuracy bench-features check-drawings clean-venv docker-smoke

$(BIN)/activate:
	$(PY) -m venv $(VENV)

# pip byte-compiles every installed file one at a time (70 s of the 175 s install here); with
# --no-compile and one parallel compileall pass the same .pyc files cost half that. (compileall
# fails on a few deliberately broken files inside packages' own tests: harmless, hence `|| true`.)
define install
	$(BIN)/pip install --quiet --no-compile -e '$(1)'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
endef

# Reinstall when the project's dependencies change. The demo needs only the runtime (`.[cpu]`);
# the tests add the `dev` extra on top.
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/activate
	$(call install,.[cpu])
	touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(call install,.[dev])
	touch $@ $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(BIN)/sbir demo --data $(DATA)

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# The browser tests need Debian's chromium: installed here when missing and possible (root and
# apt-get), else make stops first with the command to run (.ci/ensure-chromium).
browser:
	bash .ci/ensure-chromium

test: browser lint
	$(BIN)/pytest

# The long suites: SIGKILL and full-disk faults at every index-build stage, a 60 s reload storm under
# load, a longer API fuzz (tests marked slow; tests/test_make.py checks there are some).
test-slow: $(VENV)/.installed
	$(BIN)/pytest -m slow

# docs/BENCHMARKS.md, accuracy table: emoji category task over three split seeds (SEEDS="0 1 ... 9"
# for more: the ten-seed table). TRAIN_FLAGS adds
# `sbir train` flags, e.g. TRAIN_FLAGS="--finetune-blocks 6" RUNS=runs/emoji-ft on a GPU host.
bench-accuracy: $(VENV)/.installed
	$(BIN)/sbir data emoji $(DATA) --seeds $(SEEDS)
	$(BIN)/sbir features $(DATA)
	for s in $(SEEDS); do $(BIN)/sbir train $(DATA) --split category_seed$$s --seed $$s --out $(RUNS)/seed$$s $(TRAIN_FLAGS) || exit 1; done
	$(BIN)/sbir eval $(DATA) --runs $(foreach s,$(SEEDS),$(RUNS)/seed$(s)) --out $(RUNS)

# docs/img/drawings.png: twelve simple drawings sent as strokes to the demo model's service, the top 5
# of each; fails unless at least 9 of 12 have a right emoji in the top 10 (benchmarks/drawings.py).
check-drawings: $(VENV)/.installed
	$(BIN)/sbir demo --data $(DATA) --no-serve
	$(BIN)/python benchmarks/drawings.py --index runs/demo/index

# Docker deployment (docs/DEPLOY.md): installs Debian's Docker engine, builds the image on a local
# base, runs it, compose up, a reindex job through compose, compose down. As root; about 15 minutes.
docker-smoke:
	bash deploy/ci-smoke.sh

clean-venv:
	rm -rf $(VENV)
