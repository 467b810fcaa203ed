from django.urls import path

from . import views

urlpatterns = [
    path("", views.fleet, name="fleet"),
    path("nodes/<slug:node_id>/", views.node_detail, name="node_detail"),
    path("nodes/<slug:node_id>/update/", views.node_update, name="node_update"),
    path("nodes/<slug:node_id>/rollback/", views.node_rollback, name="node_rollback"),
    path("releases/", views.release_list, name="release_list"),
    path("releases/upload/", views.release_upload, name="release_upload"),
    path("events/", views.event_list, name="event_list"),
]
