PYTHON ?= .venv/bin/python

.PHONY: bench bench-smoke test lint

bench:  ## full suite (~12 min): capacity, reload under load, Colyseus side by side
	$(PYTHON) -m bench

bench-smoke:  ## the < 10 s run CI uses
	$(PYTHON) -m bench --smoke

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .
