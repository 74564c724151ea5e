# Turnpike: `make dev` runs the local stack, `make test` runs every test.
.PHONY: dev test bench loadtest lint down

dev:
	scripts/dev up

down:
	scripts/dev down

test:
	scripts/test

bench:
	scripts/bench

loadtest:
	scripts/loadtest

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	squawk migrations/*.sql
