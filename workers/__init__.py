"""The node agent: a Celery worker per node (queue `node.<id>`) that downloads, verifies and
applies bundles through the engine, and reports back signed.

No Django and no database (an import contract checks it): it may call only the engine."""
