"""
Task-state updates and their outcomes, shared by the transport, the coalescer and the applier.

An update is the body a task's supervisor would send as ``PATCH /task-instances/{id}/state``, plus
the identity the applier checks before writing it (the task instance id and its try number), plus
the writes the supervisor held back so that they commit with the state: the rendered template
fields (``PUT /task-instances/{id}/rtif``) and the return-value XCom (``POST /xcoms/...``).
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

GroupKey = tuple[str, str]
"""``(dag_id, run_id)``: updates with the same key are applied in one transaction."""


@dataclass(frozen=True)
class StateUpdate:
    """
    One task instance's request to move from ``running`` to a terminal state.

    :param ti_id: the task instance id (``task_instance.id``).
    :param try_number: the try the supervisor ran; a row with another try number is left alone.
    :param dag_id: DAG id of the task instance.
    :param run_id: run id of the task instance.
    :param payload: the JSON body of ``PATCH /task-instances/{id}/state`` as the stock client sends
        it, so the applier validates it with the API server's own data model.
    :param rendered_fields: the body of the held ``PUT /rtif``, or None when nothing was held.
    :param xcoms: the held ``POST /xcoms`` writes of this task instance, in the order the task made
        them, each ``{"key": ..., "value": ..., "dag_result": ...}`` with the value as the task
        serialised it.
    """

    ti_id: uuid.UUID
    try_number: int
    dag_id: str
    run_id: str
    payload: dict[str, Any]
    rendered_fields: dict[str, Any] | None = None
    xcoms: tuple[dict[str, Any], ...] = ()

    @property
    def group_key(self) -> GroupKey:
        """The DAG run this update belongs to."""
        return (self.dag_id, self.run_id)

    @property
    def identity(self) -> tuple[uuid.UUID, int]:
        """``(ti_id, try_number)``: the applier writes an update with this identity at most once."""
        return (self.ti_id, self.try_number)

    def to_dict(self) -> dict[str, Any]:
        """Return the update as JSON-compatible values, for a transport."""
        return {
            "ti_id": str(self.ti_id),
            "try_number": self.try_number,
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "payload": self.payload,
            "rendered_fields": self.rendered_fields,
            "xcoms": list(self.xcoms),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StateUpdate:
        """Build an update from the values of :meth:`to_dict`."""
        return cls(
            ti_id=uuid.UUID(data["ti_id"]),
            try_number=int(data["try_number"]),
            dag_id=str(data["dag_id"]),
            run_id=str(data["run_id"]),
            payload=dict(data["payload"]),
            rendered_fields=data.get("rendered_fields"),
            xcoms=tuple(data.get("xcoms") or ()),
        )


class OutcomeKind(str, enum.Enum):
    """Result kind of one update."""

    APPLIED = "applied"
    """The row now has the requested state, written by this update or by an earlier copy of it."""

    CONFLICT = "conflict"
    """The row was not running this try (cleared, rerun or already finished otherwise); it was left alone."""

    FELL_BACK = "fell_back"
    """The update was not applied; the supervisor must send it through the stock API path."""


@dataclass(frozen=True)
class Outcome:
    """
    The result of one update, sent back to the supervisor that submitted it.

    :param kind: applied, conflict or fell back.
    :param reason: for a conflict, ``"invalid_state"`` or ``"not_found"`` (the reasons the API server
        uses in its 404 and 409 responses); for a fallback, a short cause for the log.
    :param previous_state: for a conflict, the state the row was in.
    :param already_applied: for an applied update, True when an earlier copy had applied it.
    """

    kind: OutcomeKind
    reason: str = ""
    previous_state: str | None = None
    already_applied: bool = field(default=False)

    def to_json(self) -> str:
        """Serialise the outcome for a transport."""
        return json.dumps(
            {
                "kind": self.kind.value,
                "reason": self.reason,
                "previous_state": self.previous_state,
                "already_applied": self.already_applied,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Outcome:
        """Parse an outcome serialised by :meth:`to_json`."""
        data = json.loads(text)
        return cls(
            kind=OutcomeKind(data["kind"]),
            reason=str(data.get("reason") or ""),
            previous_state=data.get("previous_state"),
            already_applied=bool(data.get("already_applied")),
        )

    @classmethod
    def fell_back(cls, reason: str) -> Outcome:
        """Build a fallback outcome with its cause."""
        return cls(kind=OutcomeKind.FELL_BACK, reason=reason)
