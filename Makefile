# The two commands of the README. Each sets up .venv on first use (scripts/setup.sh).
.PHONY: setup toy test bench notebook
PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

toy: setup            ## the main job: SFT then MaskGRPO on the arithmetic toy (~6 min on 2 cores)
	$(PY) toy/arithmetic.py $(ARGS)

test: setup           ## the test suite (what CI runs)
	$(PY) -m pytest -q

bench: setup          ## speed figures as JSON
	$(PY) bench.py

notebook: setup      ## execute tutorial.ipynb; the executed copy goes to runs/tutorial.ipynb
	$(PY) scripts/run_notebook.py
