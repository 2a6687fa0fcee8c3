"""A Flower grid that delivers every message to a ClientApp in this process (no Ray, no network).

Each node has its own :class:`flwr.app.Context` that lives across messages, as a SuperNode's does,
so multi-message protocols (SecAgg+'s four stages) run exactly as deployed. Every message is
copied on the way in and out, as serialisation would, so a client can never touch the server's
objects. ``drop(stage, node)`` makes a node drop out: it answers that stage with an error, as a
SuperNode that died is reported.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.task_identity import TaskIdentity

#: A node's app: a fedtune ClientApp, or any callable with its signature.
App = Callable[[Message, Context], Message]


def stage_of(message: Message) -> str:
    """The SecAgg+ stage a message belongs to (``"train"`` for a plain train message)."""
    record = message.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(record["stage"]) if record is not None and "stage" in record else "train"


class InProcessGrid:
    """``apps[node]`` answers the messages for ``node``; replies come back in node order."""

    def __init__(
        self,
        apps: dict[int, App],
        node_configs: dict[int, dict[str, bool | int | float | str]] | None = None,
        drop: Callable[[str, int], bool] | None = None,
    ) -> None:
        self.apps = dict(apps)
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config=dict((node_configs or {}).get(node, {})),
                state=RecordDict(),
                run_config={},
            )
            for node in self.apps
        }
        self.drop = drop
        self.delivered: list[tuple[str, int]] = []  # (stage, node) of every message answered
        #: ``(stage, node, message, reply)`` of every exchange: what the server sent and received
        self.log: list[tuple[str, int, Message, Message]] = []
        self._sent = 0
        self._outbox: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def _answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        stage = stage_of(message)
        TaskIdentity.node_id = node
        try:
            if self.drop is not None and self.drop(stage, node):
                return Message(Error(code=0, reason=f"node {node} dropped out at stage {stage}"), reply_to=message)
            incoming = copy.deepcopy(message)
            try:
                reply = self.apps[node](incoming, self.contexts[node])
            except Exception as err:  # a crashing ClientApp is reported as an error reply, as Flower does
                return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            self.delivered.append((stage, node))
            if reply.has_error():
                return Message(reply.error, reply_to=message)
            return Message(copy.deepcopy(reply.content), reply_to=message)
        finally:
            TaskIdentity.node_id = 0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            self._sent += 1
            message.metadata.__dict__["_message_id"] = f"m{self._sent}"
            reply = self._answer(message)
            self.log.append((stage_of(message), message.metadata.dst_node_id, message, reply))
            self._outbox.append(reply)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        replies = [r for r in self._outbox if r.metadata.reply_to_message_id in wanted]
        self._outbox = [r for r in self._outbox if r not in replies]
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
