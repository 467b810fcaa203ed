"""API views, one module per domain; `base` holds what every one of them shares."""
