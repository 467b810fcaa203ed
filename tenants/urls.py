from django.urls import path

from . import views

urlpatterns = [
    path("", views.tenant_list, name="tenant_list"),
    path("calendar/", views.calendar, name="tenant_calendar"),
    path("blackouts/new/", views.fleet_blackout_create, name="fleet_blackout_create"),
    path("blackouts/<int:pk>/delete/", views.blackout_delete, name="blackout_delete"),
    path("<slug:slug>/", views.tenant_detail, name="tenant_detail"),
    path("<slug:slug>/windows/new/", views.window_create, name="window_create"),
    path("<slug:slug>/windows/<int:pk>/", views.window_edit, name="window_edit"),
    path("<slug:slug>/windows/<int:pk>/delete/", views.window_delete, name="window_delete"),
    path("<slug:slug>/blackouts/new/", views.blackout_create, name="blackout_create"),
    path("<slug:slug>/policy/", views.policy_update, name="policy_update"),
    path("<slug:slug>/consents/", views.consent_decide, name="consent_decide"),
    path("<slug:slug>/rollback/", views.rollback_plan, name="tenant_rollback_plan"),
]
