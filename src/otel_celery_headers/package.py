# Must equal the `instruments` extra in pyproject.toml.
_instruments = ("celery >= 5.3, < 6",)
