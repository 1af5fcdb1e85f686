# The two commands of the README (make serve, make test), and make bench. All are idempotent and
# install what they need. `make serve DATA=path/to/folder MODEL=resnet18` trains on a folder of
# labelled images (one subfolder per class); scripts/serve.sh lists every variable.
.PHONY: serve test setup demo bench image replicas replicas-down vegeta

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
# DATA=path/to/folder: train on it, export, and bake that model in (image imgserve-FOLDER-MODEL).
image: setup
	FLAVOUR=$(FLAVOUR) BASE=$(BASE) ./scripts/serve.sh image

# N replicas of the image behind HAProxy on 127.0.0.1:PORT (docs/scaleout.md), the local stand-in
# for a Kubernetes Service; BUNDLE=DIR serves a mounted bundle instead of the image's own model.
N ?= 2
PORT ?= 8080
replicas: image
	.venv/bin/python -m deploy.replicas up -n $(N) --port $(PORT) --image localhost/imgserve:$(FLAVOUR) $(if $(BUNDLE),--bundle $(BUNDLE))

replicas-down:
	.venv/bin/python -m deploy.replicas down

# vegeta into build/bin/ for `loadtests.openloop --engine vegeta` (docs/loadtests.md); needs the Go module proxy.
vegeta:
	./scripts/get_vegeta.sh
