"""Requests a browser would never send get a clear answer, never a redirect off-site or a 500."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from tests.conftest import Fleet
from updates.models import Cluster, UpdateJob


@pytest.fixture
def blue_green(fleet: Fleet) -> Cluster:
    Cluster.objects.filter(pk=fleet.cluster_a.pk).update(active_color="blue")
    return fleet.cluster_a


@pytest.mark.parametrize(
    "next_url",
    [
        "https://evil.example/phish",
        "//evil.example/phish",
        "/\\evil.example",
        "javascript:alert(1)",
        "rollout_detail",  # a view name is not a place
        "",
    ],
)
def test_switch_colour_never_redirects_off_site(
    personas: dict[str, Client], blue_green: Cluster, next_url: str
) -> None:
    url = reverse("cluster_switch_color", args=[blue_green.pk])
    response = personas["operator"].post(url, {"next": next_url})
    assert response.status_code == 302
    assert response["Location"] == reverse("rollout_list")


def test_switch_colour_follows_a_path_on_this_site(
    personas: dict[str, Client], blue_green: Cluster
) -> None:
    url = reverse("cluster_switch_color", args=[blue_green.pk])
    response = personas["operator"].post(url, {"next": "/rollouts/?page=2"})
    assert response["Location"] == "/rollouts/?page=2"


@pytest.mark.parametrize("release", ["abc", "nan", "-1", "1e3", str(2**70), "１２"])
def test_node_update_with_a_junk_release_is_a_404_and_starts_nothing(
    personas: dict[str, Client], fleet: Fleet, release: str
) -> None:
    url = reverse("node_update", args=[fleet.node_a.node_id])
    response = personas["operator"].post(url, {"release": release})
    assert response.status_code == 404
    assert not UpdateJob.objects.exists()
