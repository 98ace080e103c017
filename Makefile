# Two entry points for a fresh machine (see README "Quick start"):
#   make example   set up .venv and build the shipped example into dist/
#   make test      set up .venv (and Gradle and Chromium for the integration tests) and run every test
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: example test setup system-deps

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	# torch first, from the machine's local CPU wheel, so nothing resolves a multi-GB CUDA build.
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -e '.[test,ray]'
	# TFLite model metadata: MediaPipe's metadata writers. Its wheel pins numpy<2 and protobuf<5 for parts
	# edgebuild never imports, so it goes in without its dependencies (see plugins/edgebuild_tflite/metadata.py).
	$(VENV)/bin/python -m pip install --quiet --no-deps mediapipe==0.10.21
	touch $(STAMP)

setup: $(STAMP)

example: $(STAMP)
	$(VENV)/bin/edgebuild build -f edgebuild.yaml.example

# Debian's Gradle (4.4.1 runs offline on Java 17) for the Android hook tests, Chromium for the HTML report test.
system-deps:
	@command -v gradle >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq gradle chromium >/dev/null)

test: $(STAMP) system-deps
	$(VENV)/bin/python -m pytest -ra -n auto
