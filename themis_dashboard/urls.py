from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from tenants import views as tenant_views
from updates.api.urls import api_patterns, profile_patterns

# The site's own pages (JSON under /api/), never Django's.
handler400 = "themis_dashboard.errors.bad_request"
handler403 = "themis_dashboard.errors.permission_denied"
handler404 = "themis_dashboard.errors.page_not_found"
handler500 = "themis_dashboard.errors.server_error"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_patterns)),
    path("profile/tokens/", include(profile_patterns)),
    path("notifications/", include("updates.notifications.urls")),
    path("tenants/", include("tenants.urls")),
    path("users/", tenant_views.user_list, name="user_list"),
    path("users/new/", tenant_views.user_create, name="user_create"),
    path("users/<int:user_id>/", tenant_views.user_edit, name="user_edit"),
    path("", include("updates.urls")),
]
