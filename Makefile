PYTHON ?= .venv/bin/python

.PHONY: bench bench-smoke bench-deps test lint

bench-deps:  ## picows (load generator) and py-spy (profile)
	$(PYTHON) -m pip install -q -e '.[bench]'

bench: bench-deps  ## full suite (~10 min): capacity, reload under load, Colyseus side by side
	$(PYTHON) -m bench

bench-smoke: bench-deps  ## the < 10 s run CI uses
	$(PYTHON) -m bench --smoke

test:
	$(PYTHON) -m pytest -q

lint:  ## ruff, then mypy (strict on asobi/, configured in pyproject.toml)
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check . && $(PYTHON) -m mypy
