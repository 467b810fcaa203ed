from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from updates.fleet.node_keys import node_key_hex


class Command(BaseCommand):
    help = "Print the report key to give a node's agent as THEMIS_NODE_KEY."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("node_id")

    def handle(self, *args: Any, node_id: str, **options: Any) -> None:
        self.stdout.write(node_key_hex(node_id))
