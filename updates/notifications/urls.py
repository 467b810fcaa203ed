from django.urls import path

from . import views

app_name = "notifications"

urlpatterns = [
    path("", views.channel_list, name="channel_list"),
    path("new/", views.channel_create, name="channel_create"),
    path("<int:pk>/", views.channel_edit, name="channel_edit"),
    path("<int:pk>/delete/", views.channel_delete, name="channel_delete"),
    path("<int:pk>/test/", views.channel_test, name="channel_test"),
    path("tests/<int:pk>/", views.test_delivery_status, name="test_delivery_status"),
    path("deliveries/", views.delivery_list, name="delivery_list"),
    path("inbox/", views.inbox, name="inbox"),
]
