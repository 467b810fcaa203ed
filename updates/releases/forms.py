from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from django import forms
from django.conf import settings
from django.core.validators import MinValueValidator

from updates.models import ReleaseFeed
from updates.notifications.egress import EgressPolicy, EgressRefused, check_url


class ReleaseUploadForm(forms.Form):
    bundle = forms.FileField(help_text="A signed bundle (.tar or .tar.zst)")
    channel = forms.ChoiceField(
        choices=[("stable", "stable"), ("beta", "beta"), ("hotfix", "hotfix")], initial="stable"
    )


CHANNEL_CHOICES = [("stable", "stable"), ("beta", "beta"), ("hotfix", "hotfix")]
# The release list of the GitHub REST API, on github.com or an Enterprise server's /api/v3.
GITHUB_RELEASES_PATH = re.compile(
    r"(/api/v3)?/repos/[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}/releases/?"
)
PRODUCT = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TOKEN = re.compile(r"[\x21-\x7e]{1,512}")


def _secret_input() -> forms.PasswordInput:
    # Write-only: a saved token is never rendered back into the page.
    return forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"})


class ReleaseFeedForm(forms.Form):
    """Create or change a release feed. The kind is fixed once created."""

    name = forms.CharField(max_length=120)
    kind = forms.ChoiceField(choices=ReleaseFeed.Kind.choices)
    url = forms.CharField(
        max_length=500,
        label="URL",
        help_text="GitHub: https://api.github.com/repos/OWNER/REPO/releases · "
        "index: the JSON index's https URL (see docs/release-feeds.md)",
    )
    product = forms.CharField(max_length=64, help_text="bundles are named PRODUCT-VERSION.tar.zst")
    channel = forms.ChoiceField(
        choices=CHANNEL_CHOICES,
        initial="stable",
        help_text="for imported releases (GitHub pre-releases go to beta)",
    )
    poll_interval_seconds = forms.IntegerField(
        label="Poll every (seconds)", initial=900, max_value=7 * 86400
    )
    enabled = forms.BooleanField(required=False, initial=True)
    token = forms.CharField(
        required=False,
        max_length=512,
        widget=_secret_input(),
        help_text="optional: sent as a Bearer token to the feed's own host only; "
        "stored encrypted, never shown",
    )
    clear_token = forms.BooleanField(required=False, label="Remove the saved token")

    def __init__(self, *args: Any, feed: ReleaseFeed | None = None, **kwargs: Any) -> None:
        if feed is not None:
            kwargs.setdefault(
                "initial",
                {
                    "name": feed.name,
                    "kind": feed.kind,
                    "url": feed.url,
                    "product": feed.product,
                    "channel": feed.channel,
                    "poll_interval_seconds": feed.poll_interval_seconds,
                    "enabled": feed.enabled,
                },
            )
        else:
            kwargs.setdefault("initial", {"product": settings.THEMIS_PRODUCT})
        super().__init__(*args, **kwargs)
        self.feed = feed
        minimum = settings.THEMIS_FEED_MIN_INTERVAL_SECONDS
        interval = self.fields["poll_interval_seconds"]
        assert isinstance(interval, forms.IntegerField)
        interval.min_value = minimum
        interval.validators.append(MinValueValidator(minimum))
        interval.widget.attrs["min"] = minimum
        if feed is not None:
            self.fields["kind"].disabled = True
            if feed.token_hint:
                self.fields["token"].widget.attrs["placeholder"] = (
                    f"saved: {feed.token_hint} (leave empty)"
                )
        else:
            del self.fields["clear_token"]

    def clean_url(self) -> str:
        url = str(self.cleaned_data["url"]).strip()
        allow_http = settings.THEMIS_FEED_ALLOW_HTTP
        try:
            check_url(
                url,
                EgressPolicy.from_setting(settings.THEMIS_FEED_EGRESS_ALLOW),
                allow_http=allow_http,
            )
            parts = urlsplit(url)
        except (EgressRefused, ValueError) as refused:
            wanted = "an http(s) URL" if allow_http else "an https:// URL"
            raise forms.ValidationError(f"Enter {wanted} of a public host ({refused}).") from None
        if parts.username is not None or parts.password is not None:
            raise forms.ValidationError("Put credentials in the token field, not in the URL.")
        if parts.fragment or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
            raise forms.ValidationError("The URL has a fragment, spaces or control characters.")
        return url

    def clean_product(self) -> str:
        product = str(self.cleaned_data["product"]).strip()
        if not PRODUCT.fullmatch(product):
            raise forms.ValidationError("Lower-case letters, digits, '.', '_' and '-'.")
        return product

    def clean_token(self) -> str:
        token = str(self.cleaned_data.get("token") or "").strip()
        if token and not TOKEN.fullmatch(token):
            raise forms.ValidationError("A token is printable characters without spaces.")
        return token

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        kind = self.feed.kind if self.feed is not None else data.get("kind")
        url = data.get("url")
        if kind == ReleaseFeed.Kind.GITHUB and url and not _github_releases_url(url):
            self.add_error(
                "url", "A GitHub feed is the API's release list: …/repos/OWNER/REPO/releases"
            )
        return data


def _github_releases_url(url: str) -> bool:
    parts = urlsplit(url)
    return not parts.query and bool(GITHUB_RELEASES_PATH.fullmatch(parts.path))
