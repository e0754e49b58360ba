# The two commands of the README. Both work on a fresh machine with Python 3.10+.
PYTHON ?= python3
TOOLS := .venv-tools
DEMO := .venv-demo

.PHONY: test demo clean

$(TOOLS)/bin/tox:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --upgrade pip 'tox>=4.11'

# Every env of tox.ini: every supported Celery minor (5.3 to 5.7) on Python 3.10 to 3.13
# (docs/tests.md has the table). The type check, the docs build and the full runs one
# after the other, then the four core-subset envs side by side (tox.ini says why); both halves
# run even if the first fails, and make fails if either did.
test: $(TOOLS)/bin/tox
	$(TOOLS)/bin/tox run -m serial; serial=$$?; \
	$(TOOLS)/bin/tox run-parallel -m core -p all && exit $$serial

$(DEMO)/bin/python:
	$(PYTHON) -m venv $(DEMO)
	$(DEMO)/bin/pip install -q --upgrade pip
	$(DEMO)/bin/pip install -q -e '.[demo]'

demo: $(DEMO)/bin/python
	$(DEMO)/bin/python examples/fastapi_celery/run_demo.py

clean:
	rm -rf $(TOOLS) $(DEMO) .tox
