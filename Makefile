# The two commands of the README. Both work on a fresh machine with Python 3.10+.
PYTHON ?= python3
TOOLS := .venv-tools
DEMO := .venv-demo

.PHONY: test demo clean

$(TOOLS)/bin/tox:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --upgrade pip 'tox>=4.11'

# tox.ini's env_list, one env after the other: the type check, then every supported
# Celery minor (5.3 to 5.7) on Python 3.10 to 3.13 (README.md "Tests" has the table).
test: $(TOOLS)/bin/tox
	$(TOOLS)/bin/tox run

$(DEMO)/bin/python:
	$(PYTHON) -m venv $(DEMO)
	$(DEMO)/bin/pip install -q --upgrade pip
	$(DEMO)/bin/pip install -q -e '.[demo]'

demo: $(DEMO)/bin/python
	$(DEMO)/bin/python examples/fastapi_celery/run_demo.py

clean:
	rm -rf $(TOOLS) $(DEMO) .tox
