# The two commands of the README: `make run` and `make test`.
.PHONY: run stop test install install-test

run: install
	deploy/run

stop:
	deploy/stop

test: install-test
	.venv/bin/pytest $(PYTEST_ARGS)

install:
	deploy/install

install-test:
	deploy/install --test
