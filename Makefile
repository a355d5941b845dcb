# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned in the same pip command as everything else (see README, Development):
# an unpinned torch would pull a multi-GB download; the project itself declares ranges in pyproject.toml.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Real data beside the checkout (this project's machines) is used when MEDXAI_DATA_DIR is not set already.
ifeq ($(origin MEDXAI_DATA_DIR), undefined)
ifneq ($(wildcard ../shared/data/medmnist),)
export MEDXAI_DATA_DIR := $(abspath ../shared/data)
endif
endif

.PHONY: demo test install clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) -e ".[test,onnx,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medxai demo

test: $(STAMP) browser
	$(PY) -m pytest -q

# Debian's chromium for the report's browser test (tests/test_report_browser.py); installed only when missing and
# apt-get is usable as root. A failure is tolerated: the test then skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
			|| echo "chromium not installed; the browser test will skip"; \
	fi

clean:
	rm -rf $(VENV) runs build *.egg-info
