"""How a transaction's statements reach the server: the message policy, chosen once by name.

On PostgreSQL everything a schema's transaction sends waits and goes in as few messages as the
engine can take (one for a whole tenant, unless it must read something first). Citus forwards a
DDL statement's whole message to the workers holding the schema, so there every statement of a
migration goes in a message of its own. The session (session.py) queues parts and asks the
policy how they travel; it holds no Citus branch of its own.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg2
from psycopg2.extensions import cursor as Cursor
from yoyo.migrations import Migration

from .sqlfiles import Script


@dataclass
class Part:
    """A piece of a message, and where its text came from (to turn positions into lines)."""

    text: str
    migration: Migration | None = None
    script: Script | None = None
    offset: int = 0  # where `text` starts in the script
    alone: bool = False  # a statement that must not share a message on Citus
    data: str | None = None  # a COPY ... FROM stdin's data: the statement is sent by itself


class SendFailed(Exception):
    """A message failed: the server's error, and the parts the message held."""

    def __init__(self, error: psycopg2.Error, parts: list[Part]):
        super().__init__(str(error))
        self.error, self.parts = error, parts


#: Between the statements of one message. A newline first: a file may end in a -- comment.
SEPARATOR = "\n;\n"


class Sender:
    """Sends what a session queues, as its policy says; SendFailed when a message fails."""

    def __init__(self, cursor: Cursor, policy: type[OneMessage]):
        self.cursor, self.policy = cursor, policy
        self._parts: list[Part] = []

    def queue(self, part: Part) -> None:
        if part.data is not None:  # COPY ... FROM stdin: the statement alone, then its data
            self.flush()
            self._copy(part)
        elif part.alone and self.policy.alone_apart:
            self.flush()
            self._parts.append(part)
            self.flush()
        else:
            self._parts.append(part)

    def flush(self) -> None:
        """Send what is queued, as one message."""
        parts, self._parts = self._parts, []
        if parts:
            try:
                self.cursor.execute(SEPARATOR.join(part.text for part in parts))
            except psycopg2.Error as exc:
                raise SendFailed(exc, parts) from None

    def drop(self) -> None:
        self._parts = []

    def _copy(self, part: Part) -> None:
        try:
            self.cursor.copy_expert(part.text, io.StringIO(part.data))
        except psycopg2.Error as exc:
            raise SendFailed(exc, [part]) from None


class OneMessage:
    """PostgreSQL: a transaction's statements share messages; a migration's file goes whole (a
    COPY's data apart), and each migration has a savepoint, which in one message also says
    which migration failed."""

    name = "one message per schema"
    #: Statements marked alone share messages all the same.
    alone_apart = False
    #: A savepoint per migration even when a failure keeps nothing (provisioning).
    savepoints_when_atomic = True

    @staticmethod
    def script_parts(migration: Migration, script: Script) -> Iterator[Part]:
        for offset, text, data in script.pieces():
            yield Part(text, migration, script, offset, data is not None, data)


class StatementAlone(OneMessage):
    """Citus: every statement a migration (or the engine's DDL) sends goes in a message of its
    own, and so names itself when it fails; a transaction that keeps nothing on failure needs no
    savepoints, a round trip less per migration."""

    name = "one statement per message"
    alone_apart = True
    savepoints_when_atomic = False

    @staticmethod
    def script_parts(migration: Migration, script: Script) -> Iterator[Part]:
        for offset, text in script.statements():
            yield Part(text, migration, script, offset, True, script.copy_data(offset))


POLICIES: dict[str, type[OneMessage]] = {"postgresql": OneMessage, "citus": StatementAlone}


def policy_for(citus: bool) -> type[OneMessage]:
    """The message policy of a server: Citus's, or PostgreSQL's."""
    return POLICIES["citus" if citus else "postgresql"]
