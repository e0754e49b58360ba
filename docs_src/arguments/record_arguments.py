from otel_celery_headers import CeleryHeadersInstrumentor

CeleryHeadersInstrumentor().instrument(
    record_arguments=["billing.*", "accounts.login"],
    redact_arguments=["iban", "card_*"],
)
