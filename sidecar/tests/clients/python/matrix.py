"""redis-py's scenarios of the client matrix (sidecar/tests/clients.rs): one line per result.
No client-side caching: redis-py enables it only on Redis 7.4 or later.

Loads a script and a function library and takes a lock, then asks the driver for the state
change (`step change`) and runs the rest after it; `step drop-subscribers` asks the driver to
close the subscribers' server connections. A failed scenario prints its error instead of a result.
"""

import sys
import threading
import time

import redis

URL = sys.argv[1]
client = redis.Redis.from_url(URL, decode_responses=True)


def connect(**options):
    return redis.Redis.from_url(URL, decode_responses=True, **options)


def step(what):
    print("step", what, flush=True)
    sys.stdin.readline()


def report(name, scenario):
    try:
        result = scenario()
    except Exception as error:  # noqa: BLE001 - the driver compares what happened
        result = f"error {type(error).__name__}: {error}"
    print(name, result, flush=True)


def reads():
    """A fresh connection, which wrote nothing, reads what was written before the state change."""
    reader = connect()
    answers = {(reader.get("greeting"), str(reader.hgetall("profile"))) for _ in range(20)}
    return sorted(answers)


def pipeline():
    with client.pipeline(transaction=False) as pipe:
        for _ in range(100):
            pipe.incr("counter")
        pipe.get("counter")
        return pipe.execute()[-2:]


def watched_transaction():
    results = []
    with client.pipeline() as pipe:
        pipe.watch("balance")
        balance = int(pipe.get("balance") or 0)
        pipe.multi()
        pipe.set("balance", balance + 10)
        pipe.get("balance")
        results.append(pipe.execute())
    with client.pipeline() as pipe:
        pipe.watch("balance")
        connect().set("balance", 0)
        pipe.multi()
        pipe.set("balance", 99)
        try:
            results.append(pipe.execute())
        except redis.WatchError:
            results.append("aborted")
    return results + [client.get("balance")]


def pipelined_transaction():
    with client.pipeline(transaction=True) as pipe:
        return pipe.incr("txn").incr("txn").get("txn").execute()


def receive(pubsub, text):
    """Publishes `text` until the subscriber gets it (it may be reconnecting)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        client.publish("news", text)
        try:
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            while message is not None:
                if message["data"] == text:
                    return text
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.01)
        except redis.ConnectionError:
            pass  # the next call reconnects and subscribes again
    return f"no {text}"


def pubsub_with_reconnect():
    pubsub = client.pubsub()
    pubsub.subscribe("news")
    received = [receive(pubsub, "first")]
    step("drop-subscribers")
    received.append(receive(pubsub, "again"))
    pubsub.close()
    return received


def blocking_pops():
    pusher = threading.Timer(0.1, lambda: connect().rpush("queue", "job"))
    pusher.start()
    popped = client.blpop(["queue"], timeout=5)
    pusher.join()
    return [popped, client.blpop(["empty"], timeout=0.1)]


def resp3():
    resp3_client = connect(protocol=3)
    resp3_client.hset("hash", mapping={"a": "1", "b": "2"})
    resp3_client.zadd("zset", {"m": 1.5})
    return [resp3_client.hgetall("hash"), resp3_client.zrange("zset", 0, -1, withscores=True)]


def connection_pool():
    pooled = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(URL, max_connections=4))
    workers = [threading.Thread(target=lambda: [pooled.incr("pooled") for _ in range(50)]) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return int(pooled.get("pooled"))


# Written, loaded and taken before the state change, read and run after it.
client.set("greeting", "hello")
client.hset("profile", mapping={"name": "eden", "kind": "proxy"})
sha = client.script_load("return redis.call('INCRBY', KEYS[1], ARGV[1])")
client.function_load(
    "#!lua name=matrix\n"
    "redis.register_function('bump', function(keys, args) return redis.call('INCRBY', keys[1], args[1]) end)",
    replace=True,
)
lock = client.lock("lock", timeout=10)
acquired = lock.acquire(blocking=False)
step("change")

report("reads", reads)
report("connect", lambda: [connect().ping(), client.set("k", "v"), client.get("k")])
report("pipeline", pipeline)
report("watched-transaction", watched_transaction)
report("pipelined-transaction", pipelined_transaction)
report("pubsub-reconnect", pubsub_with_reconnect)
report("blocking-pops", blocking_pops)
report("resp3", resp3)
report("connection-pool", connection_pool)
report("evalsha", lambda: [client.evalsha(sha, 1, "scripted", 5), client.evalsha(sha, 1, "scripted", 5)])
report("fcall", lambda: [client.fcall("bump", 1, "bumped", 3), client.fcall("bump", 1, "bumped", 3)])
report("lock", lambda: [acquired, lock.extend(20), lock.owned(), lock.release(), lock.locked()])
print("done", flush=True)
