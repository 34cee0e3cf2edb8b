# forecast-bpf. `make demo` and `make test` are the two commands a newcomer needs; both run the
# set-up themselves when it is missing (it is a fast no-op the second time).
VENV     ?= $(CURDIR)/.venv
PY       := $(VENV)/bin/python
PYTEST   := $(PY) -m pytest
SETUP    := $(CURDIR)/scripts/setup.sh
# Lab kernel for the lab tier and the demo: 6.1 (bookworm) or 6.12 (bookworm-backports).
KERNEL   ?= 6.1
CLIENTS  ?= 2

.PHONY: setup venv test test-unit test-kernel test-lab test-reference lint demo deb docs-images bench bench-faults bench-scale clean

setup:
	@bash $(SETUP)

# Set-up of the virtualenv alone (no root needed).
venv:
	@bash $(SETUP) --venv

test: setup
	@$(MAKE) --no-print-directory test-unit
	@$(MAKE) --no-print-directory test-kernel
	@$(MAKE) --no-print-directory test-lab

test-unit: venv
	$(PYTEST) -m unit tests/unit

test-kernel: venv
	$(PYTEST) -m kernel tests/kernel

test-lab: venv
	FORECAST_LAB_KERNEL=$(KERNEL) $(PYTEST) -m lab --durations=0 tests/lab

# strongSwan's plugin in the lab: the reference the benchmarks compare against (not forecast-bpf's
# tests, so not part of `make test`).
test-reference: venv
	FORECAST_LAB_KERNEL=$(KERNEL) $(PYTEST) -m reference --durations=0 tests/reference

lint: venv
	$(VENV)/bin/ruff check forecast forecast_lab tests scripts
	$(VENV)/bin/ruff format --check forecast forecast_lab tests scripts
	$(VENV)/bin/mypy

# The Debian package for a gateway: build/forecast-bpf_<version>_all.deb (DEB_VERSION=... for
# another build of the same code, e.g. to rehearse an upgrade).
deb: venv
	$(PY) scripts/build_deb.py build $(DEB_VERSION)

demo: setup
	$(VENV)/bin/forecast-bpf lab demo --ipv6 --clients $(CLIENTS) --kernel $(KERNEL)

# strongSwan's forecast plugin against forecast-bpf's two paths in the lab, one VM boot, about
# 21 minutes: build/bench/report.md with plots (BENCHMARKS.md explains the method and the runs).
bench: setup test-reference
	$(VENV)/bin/forecast-bpf lab bench --kernel $(KERNEL) --out $(CURDIR)/build/bench

# Scale figures (docs/design.md, Scale): cost per copy by table size and the daemon against
# strongSwan's plugin through the faults scenario's rekeys and reauthentication (README, Faults
# under load): one VM boot, about 2 minutes. Its losses are printed, not asserted.
bench-faults: setup
	$(VENV)/bin/forecast-bpf lab run --kernel $(KERNEL) --reference-plugin --clients 3 \
		tests/lab/scripts/resilience.py 250

# 1,000 real SAs on this kernel; verifier cost per chunk size here and on both lab kernels.
bench-scale: setup
	$(PY) scripts/bench_scale.py --control-plane 10x100
	$(PY) scripts/bench_rules.py --sas 1000 4096
	$(PY) scripts/verifier_cost.py 64 256 512 576
	$(VENV)/bin/forecast-bpf lab run --kernel 6.1 --clients 1 scripts/verifier_cost.py 64 256 512
	$(VENV)/bin/forecast-bpf lab run --kernel 6.12 --clients 1 scripts/verifier_cost.py 64 256 512

# The README's pictures, from a real run: the observability tests capture the tmux screen and
# Prometheus' range data, then scripts/render_docs.py draws them (Debian's matplotlib).
docs-images: setup
	rm -rf build/docs-data
	FORECAST_DOCS_OUT=$(CURDIR)/build/docs-data $(PYTEST) -q tests/kernel/test_observability.py
	$(PY) scripts/render_docs.py build/docs-data docs

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
