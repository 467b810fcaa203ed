"""Notification pages. Thin: scoped fetch, form, service, render."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.utils.cache import patch_cache_control
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from themis_dashboard.htmx import HtmxHttpRequest, partial_template

from . import selectors, services
from .crypto import SecretUnreadable
from .forms import ChannelForm, DeliveryFilterForm
from .kinds import PAGERDUTY_KINDS

# htmx stops polling an element whose poll answers 286 (and still swaps the content).
HTMX_STOP_POLLING = 286


@require_GET
def channel_list(request: HtmxHttpRequest) -> HttpResponse:
    channels = list(selectors.channels_for_user(request.user))
    for channel in channels:
        channel.can_edit = selectors.can_edit_channel(request.user, channel)  # type: ignore[attr-defined]
    context = {
        "channels": channels,
        "can_create": selectors.can_create_channels(request.user),
    }
    return render(request, "notifications/channels.html", context)


def _form_page(request: HtmxHttpRequest, form: ChannelForm, status: int = 200) -> HttpResponse:
    context = {"form": form, "channel": form.channel, "pagerduty_kinds": sorted(PAGERDUTY_KINDS)}
    response = render(request, "notifications/channel_form.html", context, status=status)
    # A refused form carries back the secrets typed in it: never kept by a cache.
    patch_cache_control(response, no_store=True, private=True)
    return response


@require_http_methods(["GET", "POST"])
def channel_create(request: HtmxHttpRequest) -> HttpResponse:
    if not selectors.can_create_channels(request.user):
        raise PermissionDenied("read-only")
    form = ChannelForm(request.POST or None, user=request.user)
    if request.method == "GET" or not form.is_valid():
        return _form_page(request, form, status=200 if request.method == "GET" else 400)
    data = form.cleaned_data
    channel = services.channel_create(
        name=data["name"],
        channel_type=data["type"],
        tenant=data["tenant"],
        kinds=data["kinds"],
        enabled=data["enabled"],
        secrets=form.secrets(),
        user=request.user,
    )
    messages.success(request, f"Channel {channel.name} created. Send a test to check it.")
    return redirect("notifications:channel_list")


@require_http_methods(["GET", "POST"])
def channel_edit(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    channel = selectors.get_channel_for_user(request.user, pk, edit=True)
    form = ChannelForm(request.POST or None, user=request.user, channel=channel)
    if request.method == "GET" or not form.is_valid():
        return _form_page(request, form, status=200 if request.method == "GET" else 400)
    data = form.cleaned_data
    try:
        services.channel_update(
            channel=channel,
            name=data["name"],
            kinds=data["kinds"],
            enabled=data["enabled"],
            secrets=form.secrets(),
            user=request.user,
        )
    except SecretUnreadable as err:
        form.add_error(None, f"{err}: fill in every secret field.")
        return _form_page(request, form, status=400)
    messages.success(request, f"Channel {channel.name} saved.")
    return redirect("notifications:channel_list")


@require_POST
def channel_delete(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    channel = selectors.get_channel_for_user(request.user, pk, edit=True)
    services.channel_delete(channel=channel, user=request.user)
    messages.success(request, f"Channel {channel.name} deleted.")
    return redirect("notifications:channel_list")


@require_POST
def channel_test(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """Queue a test message; a coordinator sends it. With HTMX the channel's result cell
    shows "queued" and follows the delivery until it is sent or failed."""
    channel = selectors.get_channel_for_user(request.user, pk, edit=True)
    delivery = services.channel_send_test(channel=channel, user=request.user)
    if request.htmx:
        context = {"delivery": delivery, "channel": channel}
        return render(request, "notifications/channels.html#test-result", context)
    messages.info(request, f"Test message to {channel.name} queued: see the delivery log.")
    return redirect("notifications:channel_list")


@require_GET
def test_delivery_status(request: HtmxHttpRequest, pk: int) -> HttpResponse:
    """The live result of a test message (polled by its result cell until final)."""
    delivery = selectors.get_test_delivery_for_user(request.user, pk)
    context = {"delivery": delivery, "channel": delivery.channel}
    response = render(request, "notifications/channels.html#test-result", context)
    if delivery.status in (delivery.Status.SENT, delivery.Status.GAVE_UP):
        response.status_code = HTMX_STOP_POLLING
    return response


@require_GET
def delivery_list(request: HtmxHttpRequest) -> HttpResponse:
    channels = selectors.channels_for_user(request.user)
    form = DeliveryFilterForm(request.GET or None, channels=channels)
    data = form.cleaned_data if form.is_valid() else {}
    deliveries = selectors.deliveries_for_user(
        request.user, channel=data.get("channel"), status=data.get("status") or ""
    )
    page = Paginator(deliveries, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    context = {"form": form, "page": page, "query": query.urlencode()}
    template = "notifications/deliveries.html"
    return render(request, partial_template(request, template, "results"), context)


@require_GET
def inbox(request: HtmxHttpRequest) -> HttpResponse:
    """What waits on this user: canary approvals (responders, operators) and consents (the
    admins of the tenants whose nodes wait). Signing in is required by the middleware."""
    return render(request, "notifications/inbox.html", {"inbox": selectors.inbox(request.user)})
