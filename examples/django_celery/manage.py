#!/usr/bin/env python
"""Django's command-line utility for this example (runserver, migrate, ...)."""

import os
import sys


def main() -> None:
    # Under opentelemetry-instrument this default comes too late: the Django
    # instrumentation reads the settings before this file runs. Export
    # DJANGO_SETTINGS_MODULE in the environment instead (README.md, "Pitfalls").
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
