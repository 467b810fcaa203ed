from django.urls import path

from . import views

urlpatterns = [
    path("", views.fleet, name="fleet"),
    path("nodes/<slug:node_id>/", views.node_detail, name="node_detail"),
    path("releases/", views.release_list, name="release_list"),
    path("releases/upload/", views.release_upload, name="release_upload"),
    path("events/", views.event_list, name="event_list"),
]
