"""redis-py's Lock through the sidecar across a cutover, as an application holds one.

Acquired and extended before the cutover (the extend script is loaded then), extended again
and released after it. The test drives the steps: this prints a line when it is done with one
and reads a line before the next.
"""

import sys

import redis

client = redis.Redis.from_url(sys.argv[1])
lock = client.lock("lock", timeout=10)
assert lock.acquire(blocking=False), "acquired"
assert lock.extend(5), "extended before the cutover"
print("acquired", flush=True)

sys.stdin.readline()
assert lock.extend(50), "extended after the cutover"
ttl = client.pttl("lock")
lock.release()
print(f"released {ttl}", flush=True)
