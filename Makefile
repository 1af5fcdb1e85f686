# The two commands of the README. Both are idempotent and install what they need.
.PHONY: serve test setup demo

setup:
	./scripts/setup.sh

serve: setup
	./scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q

demo: serve
