"""Dashboard pages of the `updates` app, one line per view."""

from django.urls import path

from updates.events import views as event_views
from updates.fleet import views as fleet_views
from updates.releases import views as release_views
from updates.rollouts import views as rollout_views

urlpatterns = [
    path("", fleet_views.fleet, name="fleet"),
    path("fleet/poll/", fleet_views.fleet_poll, name="fleet_poll"),
    path("fleet/bulk/", fleet_views.fleet_bulk, name="fleet_bulk"),
    path("fleet/groups/", fleet_views.fleet_group_save, name="fleet_group_save"),
    path("nodes/<slug:node_id>/", fleet_views.node_detail, name="node_detail"),
    path("nodes/<slug:node_id>/update/", fleet_views.node_update, name="node_update"),
    path("nodes/<slug:node_id>/tags/", fleet_views.node_tags, name="node_tags"),
    path("nodes/<slug:node_id>/jobs/<int:job_id>/", fleet_views.node_job, name="node_job"),
    path("nodes/<slug:node_id>/rollback/", fleet_views.node_rollback, name="node_rollback"),
    path("nodes/<slug:node_id>/key/rotate/", fleet_views.node_key_rotate, name="node_key_rotate"),
    path("nodes/<slug:node_id>/key/revoke/", fleet_views.node_key_revoke, name="node_key_revoke"),
    path(
        "nodes/<slug:node_id>/jobs/<int:job_id>/end/",
        fleet_views.node_end_job,
        name="node_end_job",
    ),
    path(
        "nodes/<slug:node_id>/jobs/<int:job_id>/cancel/",
        fleet_views.node_cancel_job,
        name="node_cancel_job",
    ),
    path("nodes/<slug:node_id>/live/", fleet_views.node_stream, name="live_node"),
    path("rollouts/<int:rollout_id>/live/", rollout_views.rollout_stream, name="live_rollout"),
    path("trust/", fleet_views.trust_store_page, name="trust_store"),
    path("events/", event_views.event_list, name="event_list"),
    path("events/nodes/", event_views.event_node_search, name="event_node_search"),
    path("releases/", release_views.release_list, name="release_list"),
    path("releases/upload/", release_views.release_upload, name="release_upload"),
    path(
        "releases/<int:release_id>/deprecate/",
        release_views.release_deprecate,
        name="release_deprecate",
    ),
    path("releases/<int:release_id>/delete/", release_views.release_delete, name="release_delete"),
    path("releases/feeds/", release_views.feed_list, name="release_feed_list"),
    path("releases/feeds/new/", release_views.feed_new, name="release_feed_new"),
    path("releases/feeds/<int:feed_id>/", release_views.feed_edit, name="release_feed_edit"),
    path("releases/feeds/<int:feed_id>/poll/", release_views.feed_poll, name="release_feed_poll"),
    path(
        "artifacts/jobs/<int:job_id>/bundle",
        release_views.artifact_job_bundle,
        name="artifact_job_bundle",
    ),
    path(
        "artifacts/jobs/<int:job_id>/bundle/<str:variant>",
        release_views.artifact_job_bundle,
        name="artifact_job_bundle_variant",
    ),
    path(
        "artifacts/jobs/<int:job_id>/releases/<int:release_id>/bundle",
        release_views.artifact_job_plan_bundle,
        name="artifact_job_plan_bundle",
    ),
    path(
        "artifacts/jobs/<int:job_id>/parts/<str:name>",
        release_views.artifact_job_parts,
        name="artifact_job_parts",
    ),
    path("rollouts/", rollout_views.rollout_list, name="rollout_list"),
    path("rollouts/new/", rollout_views.rollout_new, name="rollout_new"),
    path("rollouts/<int:rollout_id>/", rollout_views.rollout_detail, name="rollout_detail"),
    path(
        "rollouts/<int:rollout_id>/approve/", rollout_views.rollout_approve, name="rollout_approve"
    ),
    path("rollouts/<int:rollout_id>/pause/", rollout_views.rollout_pause, name="rollout_pause"),
    path("rollouts/<int:rollout_id>/resume/", rollout_views.rollout_resume, name="rollout_resume"),
    path("rollouts/<int:rollout_id>/abort/", rollout_views.rollout_abort, name="rollout_abort"),
    path("rollouts/<int:rollout_id>/cancel/", rollout_views.rollout_cancel, name="rollout_cancel"),
    path("rollouts/<int:rollout_id>/retry/", rollout_views.rollout_retry, name="rollout_retry"),
    path("tenant-rollback/<slug:slug>/", rollout_views.tenant_rollback, name="tenant_rollback"),
    path(
        "clusters/<int:cluster_id>/switch-colour/",
        rollout_views.cluster_switch_color,
        name="cluster_switch_color",
    ),
]
