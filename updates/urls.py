from django.urls import path

from . import rollout_views, views

urlpatterns = [
    path("", views.fleet, name="fleet"),
    path("nodes/<slug:node_id>/", views.node_detail, name="node_detail"),
    path("nodes/<slug:node_id>/update/", views.node_update, name="node_update"),
    path("nodes/<slug:node_id>/rollback/", views.node_rollback, name="node_rollback"),
    path("releases/", views.release_list, name="release_list"),
    path("releases/upload/", views.release_upload, name="release_upload"),
    path("events/", views.event_list, name="event_list"),
    path("rollouts/", rollout_views.rollout_list, name="rollout_list"),
    path("rollouts/new/", rollout_views.rollout_new, name="rollout_new"),
    path("rollouts/<int:rollout_id>/", rollout_views.rollout_detail, name="rollout_detail"),
    *[
        path(
            f"rollouts/<int:rollout_id>/{action}/",
            getattr(rollout_views, f"rollout_{action}"),
            name=f"rollout_{action}",
        )
        for action in ("approve", "pause", "resume", "abort", "cancel", "retry")
    ],
    path("tenant-rollback/<slug:slug>/", rollout_views.tenant_rollback, name="tenant_rollback"),
    path(
        "clusters/<int:cluster_id>/switch-colour/",
        rollout_views.cluster_switch_color,
        name="cluster_switch_color",
    ),
    path("releases/<int:release_id>/deprecate/", views.release_deprecate, name="release_deprecate"),
    path("releases/<int:release_id>/delete/", views.release_delete, name="release_delete"),
    path(
        "artifacts/jobs/<int:job_id>/bundle", views.artifact_job_bundle, name="artifact_job_bundle"
    ),
    path(
        "artifacts/jobs/<int:job_id>/bundle/<str:variant>",
        views.artifact_job_bundle,
        name="artifact_job_bundle_variant",
    ),
]
