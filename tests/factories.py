from __future__ import annotations

import factory
from django.contrib.auth import get_user_model

from tenants.models import Tenant
from updates.models import Cluster, Node, Release


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("correct horse battery staple")


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant

    name = factory.Sequence(lambda n: f"Tenant {n}")
    slug = factory.Sequence(lambda n: f"tenant-{n}")


class ClusterFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Cluster

    tenant = factory.SubFactory(TenantFactory)
    name = factory.Sequence(lambda n: f"cluster-{n}")


class NodeFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Node

    node_id = factory.Sequence(lambda n: f"node-{n}")
    hostname = factory.LazyAttribute(lambda o: f"{o.node_id}.test")
    tenant = factory.SubFactory(TenantFactory)
    cluster = None
    installed_version = "1.0.0"
    status = Node.Status.ONLINE


class ReleaseFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Release

    product = "themisdb"
    version = factory.Sequence(lambda n: f"1.{n}.0")
