"""The orders table, shared by the API and the worker. Plain SQLAlchemy 2.0.

``python db.py`` creates the table (the demo's stand-in for a migration step).
"""

from __future__ import annotations

import os

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///orders.db")

# Created at import, after `opentelemetry-instrument` has instrumented SQLAlchemy,
# so every statement gets a span. SQLite waits up to 10 s for a lock held by the
# other process instead of failing at once.
engine = create_engine(
    DATABASE_URL,
    connect_args={"timeout": 10} if DATABASE_URL.startswith("sqlite") else {},
)
Session = sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(100))
    quantity: Mapped[int]
    status: Mapped[str] = mapped_column(String(30), default="received")


def create_tables() -> None:
    Base.metadata.create_all(engine)


if __name__ == "__main__":
    create_tables()
