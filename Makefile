# The two commands of the README. Both work on a fresh machine with Python 3.10+.
PYTHON ?= python3
TOOLS := .venv-tools
DEMO := .venv-demo

.PHONY: test demo clean

$(TOOLS)/bin/tox:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --upgrade pip 'tox>=4.11'

# The whole suite in tox: type check, oldest and latest supported Celery, newest Python.
test: $(TOOLS)/bin/tox
	$(TOOLS)/bin/tox run -e typecheck,celery53,celery5,newest

$(DEMO)/bin/python:
	$(PYTHON) -m venv $(DEMO)
	$(DEMO)/bin/pip install -q --upgrade pip
	$(DEMO)/bin/pip install -q -e '.[demo]'

demo: $(DEMO)/bin/python
	$(DEMO)/bin/python examples/fastapi_celery/run_demo.py

clean:
	rm -rf $(TOOLS) $(DEMO) .tox
