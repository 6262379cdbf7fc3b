"""A bare job-claiming process for the concurrency test: claims until the queue is empty, logs each id."""
import sys
import time
from pathlib import Path

from registry import Registry, jobs

url, owner, out, go = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
reg = Registry(database_url=url)
reg.init()
Path(str(out) + ".ready").touch()
while not go.exists():
    time.sleep(0.01)
ran = []
while True:
    with reg.session() as s:
        job = jobs.claim(s, owner, lease_seconds=300)
        job_id = job.id if job else None
    if job_id is None:
        break
    ran.append(job_id)
    with reg.session() as s:
        jobs.complete(s, job_id, owner, {"by": owner})
out.write_text("\n".join(map(str, ran)))
