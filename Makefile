.PHONY: setup test test-fast lint sim
setup:
	bash scripts/setup.sh
test: setup
	.venv/bin/python -m pytest -q tests
test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" tests
lint:
	.venv/bin/ruff check fedpeft strategies sims tests
sim: setup
	.venv/bin/python -m fedpeft.sim --strategy local_only
