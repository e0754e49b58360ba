def deployment(hostname: str) -> str:
    node, _, host = hostname.partition("@")
    return f"{node}@{host.rsplit('-', 2)[0]}"  # celery@orders-7d9f8b6c5-x2x7q -> celery@orders
