"""The demo fleet `make run` loads: tenants, clusters, nodes, demo PKI and signed bundles,
and the small demo service each demo node runs. Only `manage.py load_demo` imports it."""
