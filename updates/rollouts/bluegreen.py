"""Blue/green: make the other colour of a cluster take the traffic.

Owns the switch (`blue_green_switch`) and its default hook, which tells every
node its new role through the jobs outbox. Calls the models, the audit log
and the outbox only.
"""

from __future__ import annotations

from collections.abc import Callable

from django.contrib.auth.models import User
from django.db import transaction

from updates.audit import event_log
from updates.jobs import outbox
from updates.models import Cluster, Rollout

# (cluster, colour to make active, rollout or None): tests replace the default.
SwitchFn = Callable[[Cluster, str, Rollout | None], None]


def default_switch(cluster: Cluster, color: str, rollout: Rollout | None) -> None:
    """Tell every node of the cluster its new role: one outbox command per node, written
    in the switch's transaction and re-sent until the node's heartbeat shows the role."""
    with transaction.atomic():
        commands = [
            outbox.command_traffic_role(node, "active" if node.color == color else "standby")
            for node in cluster.nodes.all()
        ]
    for command in commands:
        outbox.relay_after_commit(command)


def blue_green_switch(
    *,
    rollout: Rollout | None,
    switch: SwitchFn | None,
    user: User | None,
    cluster: Cluster | None = None,
    to_color: str | None = None,
) -> str:
    """Make `to_color` (a rollout's recorded target colour, else the other colour)
    active. Setting a colour is idempotent: repeating the switch of a rollout
    re-sends the same roles and never flips traffic back."""
    if rollout is not None:
        cluster = cluster or rollout.cluster
        to_color = to_color or rollout.target_color or None
    assert cluster is not None
    # The stored colour, not a possibly stale object's: a flip must start from the truth.
    old = Cluster.objects.filter(pk=cluster.pk).values_list("active_color", flat=True).get()
    new = to_color or ("green" if old == "blue" else "blue")
    (switch or default_switch)(cluster, new, rollout)
    Cluster.objects.filter(pk=cluster.pk).update(active_color=new)
    cluster.active_color = new
    if old != new:
        event_log(
            verb="bluegreen.switched",
            actor=user,
            tenant=cluster.tenant_id,
            obj=cluster,
            details={"from": old, "to": new, "rollout_id": rollout.pk if rollout else None},
        )
    return new
