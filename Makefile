# The three commands of the README. Each one sets up .venv first when needed:
# the venv is (re)installed only when pyproject.toml is newer than the last install.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8888
# ci = small budgets (what `make test` runs), full = the real experiments
PROFILE ?= full
# JupyterLab refuses to start as root unless told
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--ServerApp.allow_root=True,)

.PHONY: setup lab run test clean-notebooks clean classroom assignments

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab --ip=127.0.0.1 --port=$(PORT) --ServerApp.root_dir=notebooks $(ROOT_FLAG) $(LAB_ARGS)

run: $(STAMP)
	FRCNN_PROFILE=$(PROFILE) $(BIN)/python -m frcnn_tutorial.series run --out build

# Teachers: nbgrader lives in its own venv (.venv-classroom) so that .venv's JupyterLab never gets its extensions;
# that venv reuses .venv's packages (torch, the course) through a .pth file and adds only the [classroom] extra.
CLASSROOM := .venv-classroom
CLASSROOM_STAMP := $(CLASSROOM)/.installed

# everything, the real nbgrader tests included: they need .venv-classroom
test: $(STAMP) $(CLASSROOM_STAMP)
	FRCNN_PROFILE=ci $(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 \
		-p no:cacheprovider tests notebooks $(PYTEST_ARGS)

classroom: $(CLASSROOM_STAMP)

$(CLASSROOM_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m frcnn_tutorial.assignments env $(CLASSROOM)
	@touch $@

# build/course/: nbgrader_config.py, source/<chapter>/, and the student versions in release/<chapter>/
assignments: $(CLASSROOM_STAMP)
	$(CLASSROOM)/bin/python -m frcnn_tutorial.assignments build --course build/course

clean-notebooks: $(STAMP)
	$(BIN)/python -m frcnn_tutorial.series strip

clean:
	rm -rf build .pytest_cache .ruff_cache
