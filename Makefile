# Taskfarm. `make run` serves on the embedded sqlite default; `make test` tests.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 5000
DATABASE_URL ?= sqlite:///taskfarm.db
export DATABASE_URL

.PHONY: install run init-db adduser test bench lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

init-db: install
	$(VENV)/bin/taskfarm-admin init-db

# make adduser USER=name PASSWORD=secret [ADMIN=1]; without PASSWORD it asks.
adduser: install
	$(VENV)/bin/taskfarm-admin adduser '$(USER)' $(if $(PASSWORD),--password '$(PASSWORD)') $(if $(ADMIN),--admin)

run: init-db
	$(VENV)/bin/taskfarm-server --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest

# make bench [BENCH_ARGS='--duration 4 --repeats 3 ...']: see bench/bench.py --help.
bench: install
	$(PY) bench/bench.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .
