"""A small in-memory Flower grid for strategy tests (real Flower Messages, no Ray, no model)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from fedtune.protocol import CONTROL_KEY, ClientReply, reply_message

#: ``(round, node) -> the arrays the node sends back``
Answer = Callable[[int, int], dict[str, np.ndarray]]


class FakeGrid:
    """A Grid of ``nodes``: each answers a train message with ``answer(round, node)`` and ``examples[node]``.

    Replies come back in node order, so float sums are the same in every run. ``reply(node)``
    may replace the :class:`~fedtune.protocol.ClientReply` a node sends (default: no DP, one step);
    ``control(round, node)`` adds a SCAFFOLD control variate to the reply, and each message's
    incoming variate is kept in ``received_controls[(round, node)]``.
    """

    def __init__(
        self,
        nodes: Iterable[int],
        answer: Answer,
        examples: dict[int, int] | None = None,
        reply: Callable[[int], ClientReply] | None = None,
        control: Answer | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self.answer_fn = answer
        self.examples = examples or {n: 10 for n in self.nodes}
        self.reply_fn = reply or (lambda node: ClientReply(f"c{node}", self.examples[node], dp=False, steps=1))
        self.control_fn = control
        self.received_controls: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._sent = 0
        self._outbox: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def answer(self, messages: Iterable[Message]) -> list[Message]:
        """The replies, in node order."""
        replies = []
        for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            self._sent += 1
            message.metadata.__dict__["_message_id"] = f"m{self._sent}"
            node = message.metadata.dst_node_id
            rnd = int(message.content["config"]["server-round"])  # type: ignore[arg-type]
            incoming = message.content.array_records.get(CONTROL_KEY)
            if incoming is not None:
                self.received_controls[(rnd, node)] = {k: incoming[k].numpy() for k in incoming.keys()}
            TaskIdentity.node_id = node
            control = self.control_fn(rnd, node) if self.control_fn is not None else None
            replies.append(reply_message(message, self.reply_fn(node), {}, self.answer_fn(rnd, node), control))
        TaskIdentity.node_id = 0
        return replies

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        self._outbox = self.answer(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        replies = [r for r in self._outbox if r.metadata.reply_to_message_id in wanted]
        self._outbox = [r for r in self._outbox if r not in replies]
        return replies
