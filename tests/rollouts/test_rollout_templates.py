"""Rollout templates: the new-rollout form's options saved under a name and brought back,
every option surviving the round trip; replaced by name; audited; operators only."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from tests.rollouts.test_rollout_views import Personas, _form, _no_agents, cluster_b, release
from updates.models import Cluster, Event, Release, Rollout, RolloutTemplate
from updates.rollouts.forms import RolloutForm, initial_from_template

pytestmark = pytest.mark.django_db
__all__ = ["_no_agents", "cluster_b", "release"]

CAUTIOUS = {
    "strategy": "canary",
    "stages": "2, 10, 50, 100",
    "auto_promote": "on",
    "max_error_rate": "1.5",
    "max_p99_ms": "250",
    "bake_seconds": "120",
    "four_eyes": "on",
    "max_unavailable": "2",
    "max_parallel": "7",
    "health_timeout": "45",
    "contract_delay": "600",
    "ack_timeout": "20",
    "max_sends": "4",
    "progress_timeout": "900",
    "offline_grace": "90",
}


def test_options_saved_as_a_template_come_back_as_they_were(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    client = personas["operator"]
    data = _form(release, cluster=cluster_b.pk, **CAUTIOUS)
    data.pop("rollback_on_failure")  # off: that too must come back
    saved = client.post(
        reverse("rollout_new"), {**data, "save_template": "1", "template_name": "cautious"}
    )
    template = RolloutTemplate.objects.get()
    assert saved.status_code == 302 and saved["Location"].endswith(f"?template={template.pk}")
    assert not Rollout.objects.exists()  # a template starts nothing
    assert Event.objects.get(verb="rollout_template.saved").details["name"] == "cautious"

    page = client.get(reverse("rollout_new"), {"template": template.pk}).content.decode()
    assert 'value="2, 10, 50, 100"' in page and 'value="cautious"' in page
    # What the form holds when opened from the template is what was saved.
    as_sent = {
        name: "on" if value is True else value
        for name, value in initial_from_template(template).items()
        if value is not False  # an unticked box is not sent
    }
    form = RolloutForm(
        {"release": release.pk, "cluster": cluster_b.pk, **as_sent},
        user=get_user_model().objects.get(username="olivia"),
    )
    assert form.is_valid(), form.errors
    assert form.options().to_json() == template.opts.to_json()
    assert template.opts.four_eyes and template.opts.gate.max_p99_ms == 250
    assert not template.opts.rollback_on_failure


def test_saving_under_an_existing_name_replaces_it(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    client = personas["operator"]
    for rate in ("1", "3"):
        client.post(
            reverse("rollout_new"),
            {
                **_form(release, cluster=cluster_b.pk, max_error_rate=rate),
                "save_template": "1",
                "template_name": "house",
            },
        )
    template = RolloutTemplate.objects.get()
    assert template.opts.gate.max_error_rate == pytest.approx(0.03)
    assert Event.objects.filter(verb="rollout_template.replaced").count() == 1


def test_a_template_needs_a_name_and_only_operators_save_one(
    personas: Personas, release: Release, cluster_b: Cluster
) -> None:
    nameless = personas["operator"].post(
        reverse("rollout_new"),
        {**_form(release, cluster=cluster_b.pk), "save_template": "1", "template_name": "  "},
    )
    assert nameless.status_code == 400
    assert "name the template to save it" in nameless.content.decode()
    refused = personas["responder"].post(
        reverse("rollout_new"),
        {**_form(release, cluster=cluster_b.pk), "save_template": "1", "template_name": "x"},
    )
    assert refused.status_code == 403
    assert not RolloutTemplate.objects.exists()


def test_an_unknown_template_opens_the_plain_form(personas: Personas) -> None:
    for wanted in ("999999", "abc", "1" * 20):
        response = personas["operator"].get(reverse("rollout_new"), {"template": wanted})
        assert response.status_code == 200
