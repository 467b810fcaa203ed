from __future__ import annotations

from typing import Any

from django import forms
from django.http import QueryDict

from tenants.models import Tenant
from updates.fleet import selectors
from updates.fleet.selectors import DEFAULT_SORT, FLEET_SORTS, NodeFilter
from updates.models import TAG_PATTERN, Node

# How the page shows its nodes: a tile each (the default), or a row each of one table.
TILES, TABLE = "tiles", "table"


class FleetFilterForm(forms.Form):
    """The fleet page's search, filters and sort, all from the query string. A value that
    does not fit is dropped with its error shown; the other filters still apply."""

    q = forms.CharField(
        required=False,
        max_length=64,
        label="Search",
        widget=forms.TextInput(attrs={"placeholder": "node id or hostname prefix"}),
    )
    tenant = forms.ChoiceField(required=False)
    cluster = forms.TypedChoiceField(required=False, coerce=int, empty_value=None)
    status = forms.ChoiceField(required=False, choices=[("", "any status"), *Node.Status.choices])
    version = forms.CharField(
        required=False, max_length=64, widget=forms.TextInput(attrs={"placeholder": "version"})
    )
    tag = forms.RegexField(
        required=False,
        regex=TAG_PATTERN,
        max_length=40,
        widget=forms.TextInput(attrs={"placeholder": "tag"}),
        error_messages={"invalid": "not a tag: lowercase letters, digits, . _ : -"},
    )
    sort = forms.ChoiceField(
        required=False,
        label="Sort by",
        choices=[(key, label) for key, (label, _order) in FLEET_SORTS.items()],
    )
    layout = forms.ChoiceField(
        required=False, label="Show as", choices=[(TILES, "tiles"), (TABLE, "a table")]
    )

    def __init__(self, data: QueryDict, *, tenants: list[Tenant], **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        # Scoped choices: a tenant admin cannot even name another tenant or its clusters.
        self._tenants = {t.slug: t for t in tenants}
        chosen = self._tenants.get(str(data.get("tenant", "")))
        # Only the chosen tenant's clusters: every cluster of the fleet would be thousands
        # of options on every page view.
        clusters = selectors.fleet_clusters(chosen)
        self.fields["tenant"].choices = [("", "all tenants"), *((t.slug, t.name) for t in tenants)]  # type: ignore[attr-defined]
        self.fields["cluster"].choices = [("", "all clusters"), *((c.pk, c.name) for c in clusters)]  # type: ignore[attr-defined]

    def to_filter(self) -> NodeFilter:
        self.is_valid()
        # Only the fields that passed: a bad sort key must not cost the search its filter.
        data = self.cleaned_data
        return NodeFilter(
            search=data.get("q") or "",
            tenant=self._tenants.get(data.get("tenant") or ""),
            cluster_id=data.get("cluster"),
            status=data.get("status") or "",
            version=data.get("version") or "",
            tag=data.get("tag") or "",
            sort=data.get("sort") or DEFAULT_SORT,
        )

    def chosen_layout(self) -> str:
        self.is_valid()
        return TABLE if self.cleaned_data.get("layout") == TABLE else TILES

    def as_query(self, page: int) -> QueryDict:
        """The fleet view as a query string, from the values that passed: links and the
        live poll carry it on, and nothing else the request held."""
        flt = self.to_filter()
        query = QueryDict(mutable=True)
        values = {
            "q": flt.search,
            "tenant": flt.tenant.slug if flt.tenant else "",
            "cluster": "" if flt.cluster_id is None else str(flt.cluster_id),
            "status": flt.status,
            "version": flt.version,
            "tag": flt.tag,
            "sort": "" if flt.sort == DEFAULT_SORT else flt.sort,
            "page": "" if page == 1 else str(page),
            "layout": "" if self.chosen_layout() == TILES else TABLE,
        }
        for key, value in values.items():
            if value:
                query[key] = value
        return query
