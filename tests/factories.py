"""Model factories. factory_boy's declarations (Sequence, SubFactory, ...) and
the factory call itself (`UserFactory(...)`, via its metaclass) are not
annotated: the `make_*` functions below are the typed way to build rows, the
`*Factory` classes stay usable as before."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import factory.django
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from factory import declarations
from factory.builder import Resolver

from tenants.models import Tenant
from updates.models import Cluster, Node, Release


# Typed constructors for the unannotated factory_boy declarations: the one
# place where the missing annotations of the library have to be silenced.
def _sequence(function: Callable[[int], str]) -> declarations.Sequence:
    return declarations.Sequence(function)  # type: ignore[no-untyped-call]  # factory_boy: unannotated


def _lazy_attribute(function: Callable[[Resolver], str]) -> declarations.LazyAttribute:
    return declarations.LazyAttribute(function)  # type: ignore[no-untyped-call]  # factory_boy: unannotated


def _sub_factory(
    factory_class: type[factory.django.DjangoModelFactory[Any]],
) -> declarations.SubFactory:
    return declarations.SubFactory(factory_class)  # type: ignore[no-untyped-call]  # factory_boy: unannotated


def _password(raw: str) -> factory.django.Password:
    return factory.django.Password(raw)  # type: ignore[no-untyped-call]  # factory_boy: unannotated


class UserFactory(factory.django.DjangoModelFactory[User]):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = _sequence(lambda n: f"user{n}")
    password = _password("correct horse battery staple")


class TenantFactory(factory.django.DjangoModelFactory[Tenant]):
    class Meta:
        model = Tenant

    name = _sequence(lambda n: f"Tenant {n}")
    slug = _sequence(lambda n: f"tenant-{n}")


class ClusterFactory(factory.django.DjangoModelFactory[Cluster]):
    class Meta:
        model = Cluster

    tenant = _sub_factory(TenantFactory)
    name = _sequence(lambda n: f"cluster-{n}")


class NodeFactory(factory.django.DjangoModelFactory[Node]):
    class Meta:
        model = Node

    node_id = _sequence(lambda n: f"node-{n}")
    hostname = _lazy_attribute(lambda o: f"{o.node_id}.test")
    tenant = _sub_factory(TenantFactory)
    cluster = None
    installed_version = "1.0.0"
    status = Node.Status.ONLINE


class ReleaseFactory(factory.django.DjangoModelFactory[Release]):
    class Meta:
        model = Release

    product = "themisdb"
    version = _sequence(lambda n: f"1.{n}.0")


# Typed entry points: keyword arguments are model field values.
def make_user(**fields: object) -> User:
    return UserFactory.create(**fields)


def make_tenant(**fields: object) -> Tenant:
    return TenantFactory.create(**fields)


def make_cluster(**fields: object) -> Cluster:
    return ClusterFactory.create(**fields)


def make_node(**fields: object) -> Node:
    return NodeFactory.create(**fields)


def build_node(**fields: object) -> Node:
    """An unsaved Node (factory_boy's build strategy)."""
    return NodeFactory.build(**fields)


def make_release(**fields: object) -> Release:
    return ReleaseFactory.create(**fields)
