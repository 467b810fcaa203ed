from __future__ import annotations

from django import forms


class ReleaseUploadForm(forms.Form):
    bundle = forms.FileField(help_text="A signed bundle (.tar or .tar.zst)")
    channel = forms.ChoiceField(
        choices=[("stable", "stable"), ("beta", "beta"), ("hotfix", "hotfix")], initial="stable"
    )
