"""The embedded broker: kombu's SQLAlchemy transport with a cheaper send and no consumed rows.

kombu's channel looks its queue up and goes through the ORM's unit of work for every message
it sends, and it keeps every message it has handed out (marked invisible) forever. This channel
remembers queue ids, sends with one Core insert, and deletes a message as it hands it out: the
same delivery guarantee (none after a crash; the database lease and the reconciler cover that,
see docs/ARCHITECTURE.md), a constant-size broker file, and a send that costs a third as much.
"""

from __future__ import annotations

from queue import Empty
from typing import Any

from kombu.transport import sqlalchemy as kombu_sqlalchemy
from kombu.utils.json import dumps, loads
from sqlalchemy import delete, insert, select, text
from sqlalchemy.exc import OperationalError


class LeanChannel(kombu_sqlalchemy.Channel):
    """A kombu SQLAlchemy channel: cached queue ids, Core statements, consumed rows deleted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue_ids: dict[str, int] = {}

    def _queue_id(self, queue: str) -> int:
        if queue not in self._queue_ids:
            self._queue_ids[queue] = self._get_or_create(queue).id
        return self._queue_ids[queue]

    def create_publish_batch(self, max_size: int) -> LeanPublishBatch:
        """What ``Producer.batch()`` sends through: many messages, one insert."""
        return LeanPublishBatch(self)

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        row = {"queue_id": self._queue_id(queue), "payload": dumps(payload), "visible": True}
        batch: LeanPublishBatch | None = kwargs.get("_publish_batch")
        if batch is not None:
            batch.rows.append(row)
        else:
            self.insert_messages([row])

    def insert_messages(self, rows: list[dict[str, Any]]) -> None:
        try:
            self.session.execute(insert(self.message_cls.__table__), rows)
            self.session.commit()
        except OperationalError:
            self.session.rollback()
            raise

    def _get(self, queue: str) -> Any:
        table = self.message_cls.__table__
        queue_id = self._queue_id(queue)
        if self.session.bind.name == "sqlite":
            self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))  # one taker per message
        try:
            row = self.session.execute(
                select(table.c.id, table.c.payload)
                .where(table.c.queue_id == queue_id, table.c.visible.is_(True))
                .order_by(table.c.timestamp, table.c.id)
                .limit(1)
                .with_for_update()
            ).first()
            if row is None:
                raise Empty()
            self.session.execute(delete(table).where(table.c.id == row.id))
            return loads(row.payload)
        finally:
            self.session.commit()


class LeanPublishBatch:
    """Messages published in a ``Producer.batch()`` block, inserted together when it ends."""

    def __init__(self, channel: LeanChannel) -> None:
        self.channel = channel
        self.rows: list[dict[str, Any]] = []

    def publish(self, message: Any, **kwargs: Any) -> None:
        self.channel.basic_publish(message, _publish_batch=self, **kwargs)

    def flush(self) -> None:
        rows, self.rows = self.rows, []
        if rows:
            self.channel.insert_messages(rows)

    def discard(self) -> None:
        self.rows = []

    close = discard  # kombu closes a batch after flushing or discarding it


def use_lean_channel() -> None:
    """Make kombu's ``sqla+`` transport use :class:`LeanChannel` in this process."""
    kombu_sqlalchemy.Transport.Channel = LeanChannel
