# wisp — the two commands of README.md:
#   make run    set up what is missing, build, serve the default model on 127.0.0.1:8080
#   make test   set up what is missing, build once (release), run every test
#
# Tests and the binary share the release profile, so `make test` then `make run` builds once.

CARGO ?= cargo
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: run test build model plugins web test-deps bench

# Serves ./wisp.toml: the default model and the default plugins.
run: model plugins web build
	$(TARGET_DIR)/release/wisp serve

build:
	$(CARGO) build --release --bin wisp

test: model plugins web test-deps
	scripts/test.sh

model:
	scripts/fetch-model.sh

# The built-in governance plugins, as components in plugins/dist/.
plugins:
	scripts/build-plugins.sh

# The web chat, built into web/dist and embedded in the binary.
web:
	scripts/build-web.sh

test-deps:
	scripts/setup-test-deps.sh

# wisp beside llama.cpp (engine, servers under load, next-turn TTFT) on the same GGUF; ends in the goals table.
bench: model
	scripts/bench-vs-llama.sh
