from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from updates.api.urls import api_patterns, profile_patterns

# A request Django refuses before any view (an untrusted Host header, ...) answers JSON under
# /api/ too.
handler400 = "updates.api.views.base.bad_request"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_patterns)),
    path("profile/tokens/", include(profile_patterns)),
    path("notifications/", include("updates.notifications.urls")),
    path("tenants/", include("tenants.urls")),
    path("", include("updates.urls")),
]
