"""Client failures, logged once per reason, and the rule that stops a run that cannot learn."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message
from flwr.supercore import log

__all__ = ["FailureLog", "SplitFedRunError"]

NO_REPLY = (
    "sent no reply before the round timeout (it stalled, lost its connection, or its process died)"
)
_SHOWN_NODES = 10


class SplitFedRunError(RuntimeError):
    """A SplitFed run stopped because no client finished several rounds in a row."""


class FailureLog:
    """Groups the failed replies of each round by reason and logs each reason in full once.

    A reason seen in an earlier round is logged again only by its number, with the nodes and the
    count of this round, so a failure that repeats every round costs a line per round, not a
    traceback per client.
    """

    def __init__(self) -> None:
        self._reasons: dict[str, int] = {}
        self._failed_rounds = 0
        self._last: dict[str, list[int]] = {}

    def record(
        self, server_round: int, phase: str, selected: list[int], replies: Iterable[Message]
    ) -> list[Message]:
        """Log the failures among ``replies`` to the messages sent to ``selected``; return the
        replies that completed. ``phase`` is ``"train"`` or ``"evaluate"``."""
        failed: dict[str, list[int]] = {}
        completed, replied = [], set()
        for msg in replies:
            node_id = msg.metadata.src_node_id
            replied.add(node_id)
            if msg.has_error():
                failed.setdefault(str(msg.error.reason), []).append(node_id)
            else:
                completed.append(msg)
        missing = [node_id for node_id in selected if node_id not in replied]
        if missing:
            failed.setdefault(NO_REPLY, []).extend(missing)
        for reason, nodes in failed.items():
            self._log(server_round, phase, len(selected), reason, nodes)
        if phase == "train":
            self._failed_rounds = 0 if completed or not selected else self._failed_rounds + 1
            self._last = failed
        return completed

    def check(self, server_round: int, max_failed_rounds: int) -> None:
        """Raise :class:`SplitFedRunError` after ``max_failed_rounds`` rounds in a row in which
        no selected client finished its training."""
        if self._failed_rounds < max_failed_rounds:
            return
        reasons = "; ".join(
            f"{reason} ({len(nodes)} node(s))" for reason, nodes in self._last.items()
        )
        raise SplitFedRunError(
            f"no client finished its training in {self._failed_rounds} rounds in a row (up to "
            f"round {server_round}); the run stops instead of going on without learning. "
            f"Reasons in the last round: {reasons}. Fix the ClientApp (its log has the "
            "traceback), or raise max_failed_rounds to wait longer"
        )

    def _log(
        self, server_round: int, phase: str, selected: int, reason: str, nodes: list[int]
    ) -> None:
        shown = ", ".join(str(n) for n in nodes[:_SHOWN_NODES])
        if len(nodes) > _SHOWN_NODES:
            shown += f" and {len(nodes) - _SHOWN_NODES} more"
        number = self._reasons.get(reason)
        if number is None:
            number = self._reasons[reason] = len(self._reasons) + 1
            log(
                WARNING,
                "[SplitFed] round %d %s: %d of %d selected node(s) failed and are left out "
                "(failure #%d): %s [nodes %s]",
                server_round,
                phase,
                len(nodes),
                selected,
                number,
                reason,
                shown,
            )
        else:
            log(
                WARNING,
                "[SplitFed] round %d %s: %d of %d selected node(s) failed again with failure #%d "
                "[nodes %s]",
                server_round,
                phase,
                len(nodes),
                selected,
                number,
                shown,
            )
