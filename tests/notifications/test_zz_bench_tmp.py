import time
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from tests.notifications.test_dispatch import _job_failed

pytestmark = pytest.mark.django_db

def test_bench(make_channel, receivers, fleet, nudges, django_capture_on_commit_callbacks):
    for _ in range(4):
        make_channel("slack", receivers().url)
    with CaptureQueriesContext(connection) as q:
        t = time.perf_counter()
        with django_capture_on_commit_callbacks(execute=True):
            for i in range(200):
                _job_failed(f"n-{i}", fleet.tenant_a, rollout_id=5)
        dt = time.perf_counter() - t
    from collections import Counter
    c = Counter(x["sql"].split(" ")[0] for x in q.captured_queries)
    print(f"\n200 events: {dt:.2f}s, {len(q.captured_queries)} queries {c}")
    for x in q.captured_queries[-14:]:
        print(x["time"], x["sql"][:150])
