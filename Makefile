# The two commands of the README. Both are idempotent and install what they need.
.PHONY: serve test setup demo image

setup:
	./scripts/setup.sh

serve: setup
	./scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q

demo: serve

# The serving image from the bento (docs/container.md): FLAVOUR=cpu (default) or gpu; BASE=auto
# (stock base when it can be pulled, else a local Debian base made once), stock or local.
FLAVOUR ?= cpu
BASE ?= auto
image: setup
	SERVE=0 ./scripts/demo.sh
	.venv/bin/python -m container build --flavour $(FLAVOUR) --base $(BASE) --bundle bundles/default
