"""/api/v1/: the JSON API, its schema and docs; /profile/tokens/: the token page."""

from django.contrib.auth.decorators import login_not_required
from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from updates.api.views import channels, events, nodes, releases, rollouts, tenants, tokens
from updates.api.views.base import not_found

# The schema and its docs page are public: they describe the API, they hold no data.
schema_view = login_not_required(
    SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[])
)
docs_view = login_not_required(
    SpectacularSwaggerSplitView.as_view(
        url_name="api_schema",
        template_name="api/swagger_ui.html",
        authentication_classes=[],
        permission_classes=[],
    )
)

api_patterns = [
    path("schema/", schema_view, name="api_schema"),
    path("docs/", docs_view, name="api_docs"),
    path("token/", tokens.WhoAmI.as_view(), name="api_token"),
    path("releases/", releases.ReleaseList.as_view(), name="api_releases"),
    path("releases/<int:release_id>/", releases.ReleaseDetail.as_view(), name="api_release"),
    path(
        "releases/<int:release_id>/deprecate/",
        releases.ReleaseDeprecate.as_view(),
        name="api_release_deprecate",
    ),
    path("nodes/", nodes.NodeList.as_view(), name="api_nodes"),
    path("nodes/<slug:node_id>/", nodes.NodeDetail.as_view(), name="api_node"),
    path("nodes/<slug:node_id>/update/", nodes.NodeUpdate.as_view(), name="api_node_update"),
    path("nodes/<slug:node_id>/rollback/", nodes.NodeRollback.as_view(), name="api_node_rollback"),
    path(
        "nodes/<slug:node_id>/jobs/<int:job_id>/end/",
        nodes.JobEnd.as_view(),
        name="api_job_end",
    ),
    path(
        "nodes/<slug:node_id>/jobs/<int:job_id>/cancel/",
        nodes.JobCancel.as_view(),
        name="api_job_cancel",
    ),
    path("rollouts/", rollouts.RolloutList.as_view(), name="api_rollouts"),
    path("rollouts/preview/", rollouts.RolloutPreview.as_view(), name="api_rollout_preview"),
    path("rollouts/<int:rollout_id>/", rollouts.RolloutDetail.as_view(), name="api_rollout"),
    *[
        path(f"rollouts/<int:rollout_id>/{action}/", view.as_view(), name=f"api_rollout_{action}")
        for action, view in {
            "start": rollouts.RolloutStart,
            "approve": rollouts.RolloutApprove,
            "pause": rollouts.RolloutPause,
            "resume": rollouts.RolloutResume,
            "abort": rollouts.RolloutAbort,
            "cancel": rollouts.RolloutCancel,
            "retry": rollouts.RolloutRetry,
        }.items()
    ],
    path("events/", events.EventList.as_view(), name="api_events"),
    path("channels/", channels.ChannelList.as_view(), name="api_channels"),
    path("channels/<int:channel_id>/", channels.ChannelDetail.as_view(), name="api_channel"),
    path("blackouts/", tenants.FleetBlackouts.as_view(), name="api_blackouts"),
    path("blackouts/<int:blackout_id>/", tenants.FleetBlackout.as_view(), name="api_blackout"),
    path("tenants/", tenants.TenantList.as_view(), name="api_tenants"),
    path("tenants/<slug:slug>/", tenants.TenantDetail.as_view(), name="api_tenant"),
    path(
        "tenants/<slug:slug>/consent/", tenants.TenantConsent.as_view(), name="api_tenant_consent"
    ),
    path("tenants/<slug:slug>/policy/", tenants.TenantPolicy.as_view(), name="api_tenant_policy"),
    path(
        "tenants/<slug:slug>/windows/", tenants.TenantWindows.as_view(), name="api_tenant_windows"
    ),
    path(
        "tenants/<slug:slug>/windows/<int:window_id>/",
        tenants.TenantWindow.as_view(),
        name="api_tenant_window",
    ),
    path(
        "tenants/<slug:slug>/blackouts/",
        tenants.TenantBlackouts.as_view(),
        name="api_tenant_blackouts",
    ),
    path(
        "tenants/<slug:slug>/blackouts/<int:blackout_id>/",
        tenants.TenantBlackout.as_view(),
        name="api_tenant_blackout",
    ),
    # Anything else, newlines in the path included.
    re_path(r"^[\s\S]*\Z", login_not_required(not_found)),
]

profile_patterns = [
    path("", tokens.token_page, name="api_tokens"),
    path("new/", tokens.token_create, name="api_token_create"),
    path("<int:token_id>/revoke/", tokens.token_revoke, name="api_token_revoke"),
]
