# The two commands of the README (make serve, make test), and make bench. All are idempotent and
# install what they need. `make serve DATA=path/to/folder MODEL=resnet18` trains on a folder of
# labelled images (one subfolder per class); scripts/serve.sh lists every variable.
.PHONY: serve test setup demo bench image

setup:
	./scripts/setup.sh

serve: setup
	./scripts/serve.sh serve

bench: setup
	./scripts/serve.sh bench

test: setup
	.venv/bin/python -m pytest -q

demo: serve

# The serving image from the bento (docs/container.md): FLAVOUR=cpu (default) or gpu; BASE=auto
# (stock base when it can be pulled, else a local Debian base made once), stock or local.
FLAVOUR ?= cpu
BASE ?= auto
image: setup
	./scripts/serve.sh build
	.venv/bin/python -m container build --flavour $(FLAVOUR) --base $(BASE) --bundle bundles/default
