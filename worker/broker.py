"""The embedded broker: kombu's SQLAlchemy transport with a cheaper send and no consumed rows.

kombu's channel looks its queue up and goes through the ORM's unit of work for every message
it sends, and it keeps every message it has handed out (marked invisible) forever. This channel
remembers queue ids, sends with one Core insert, and deletes a message as it hands it out: the
same delivery guarantee (none after a crash; the database lease and the reconciler cover that,
see DESIGN.md), a constant-size broker file, and a send that costs a third as much.
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

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        table = self.message_cls.__table__
        values = {"queue_id": self._queue_id(queue), "payload": dumps(payload), "visible": True}
        try:
            self.session.execute(insert(table).values(**values))
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


def use_lean_channel() -> None:
    """Make kombu's ``sqla+`` transport use :class:`LeanChannel` in this process."""
    kombu_sqlalchemy.Transport.Channel = LeanChannel
