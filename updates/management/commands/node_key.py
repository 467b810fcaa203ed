from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from updates.fleet.node_keys import node_key_hex
from updates.models import Node


class Command(BaseCommand):
    help = (
        "Print the key to give a node's agent as THEMIS_NODE_KEY (it signs the agent's"
        " reports and checks the dashboard's commands). Keep it out of logs."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("node_id")

    def handle(self, *args: Any, node_id: str, **options: Any) -> None:
        node = Node.objects.filter(node_id=node_id).first()
        if node is None:
            raise CommandError(f"no node {node_id!r}")
        key = node_key_hex(node_id)
        if not key:
            raise CommandError(f"the key of {node_id} is revoked: rotate it on the node page")
        self.stdout.write(key)
