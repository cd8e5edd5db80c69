# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: venv demo test lint typecheck unit mosquitto faketime dbus hubtools schema clean faults faults-long bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "rpm-gateway needs Python 3.11 or newer (found $$($(PYTHON) --version))"; exit 1; }
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || \
	  { echo "Python's venv module is missing: sudo apt-get install python3-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --editable '.[dev]'
	@touch $@

demo: venv
	$(BIN)/rpm-gateway demo

test: venv mosquitto faketime dbus hubtools lint typecheck
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check gateway drivers tests faults bench

typecheck: venv
	$(BIN)/mypy gateway drivers faults bench

# The fault matrix: real processes (agent, simulated devices, mosquitto) under real faults;
# one row per fault, non-zero exit on any loss outside the measured commit window.
faults: venv mosquitto faketime
	$(BIN)/python -m faults

faults-long: venv mosquitto faketime
	$(BIN)/python -m faults --long

# The hub-clock fault row runs the agent under libfaketime (the machine's clock is never touched).
faketime:
	@if [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] || \
	    [ -e /usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1 ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing faketime with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime; \
	else \
	  echo "the clock fault row needs libfaketime: sudo apt-get install faketime"; \
	fi

# The unit's tests: systemd-analyze (verify, security), shellcheck (install.sh), strace (the
# unit's system-call list against the agent's calls). Without them those tests skip.
hubtools:
	@missing=""; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v shellcheck >/dev/null 2>&1 || missing="$$missing shellcheck"; \
	command -v strace >/dev/null 2>&1 || missing="$$missing strace"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing$$missing with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else \
	  echo "the systemd unit's tests skip without:$$missing (sudo apt-get install$$missing)"; \
	fi

# Benchmarks against baselines measured in the same run; writes bench/results.json.
bench: venv mosquitto
	@if command -v strace >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing strace with apt-get (bench/wear counts fsyncs with it)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace; \
	else \
	  echo "bench/wear counts fsyncs with strace: sudo apt-get install strace"; exit 1; \
	fi
	$(BIN)/python -m bench

# The integration tests need a real mosquitto; install it from Debian when we can.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing mosquitto with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; \
	else \
	  echo "mosquitto is needed for the tests: sudo apt-get install mosquitto"; exit 1; \
	fi

# The BlueZ tier of the tests runs bleak's BlueZ backend over a private dbus-daemon.
dbus:
	@if command -v dbus-daemon >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing dbus with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dbus; \
	else \
	  echo "dbus-daemon is needed for the BlueZ tests: sudo apt-get install dbus"; exit 1; \
	fi

# Regenerate the published JSON Schemas (reading, status, event) after changing
# gateway/models.py or gateway/messages.py.
schema: venv
	$(BIN)/python -c 'from pathlib import Path; from gateway.messages import write_schemas; \
	  write_schemas(Path("schema"))'

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
