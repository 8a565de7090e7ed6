package eden;

import java.net.URI;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.TreeMap;
import java.util.TreeSet;
import java.util.concurrent.ConcurrentHashMap;

import redis.clients.jedis.DefaultJedisClientConfig;
import redis.clients.jedis.HostAndPort;
import redis.clients.jedis.Jedis;
import redis.clients.jedis.JedisPool;
import redis.clients.jedis.JedisPoolConfig;
import redis.clients.jedis.JedisPubSub;
import redis.clients.jedis.Pipeline;
import redis.clients.jedis.RedisProtocol;
import redis.clients.jedis.Transaction;
import redis.clients.jedis.exceptions.JedisConnectionException;

/**
 * Jedis's scenarios of the client matrix: one line per result. Jedis has no lock of its own, and
 * enables client-side caching only on Redis 7.4 or later.
 */
public final class JedisMatrix {
    private static URI uri;

    public static void main(String[] args) throws Exception {
        uri = URI.create(args[0]);
        Jedis client = new Jedis(uri);
        // Written and loaded before the state change, read and run after it.
        client.set("greeting", "hello");
        client.hset("profile", new TreeMap<>(java.util.Map.of("name", "eden", "kind", "proxy")));
        String sha = client.scriptLoad(Matrix.SCRIPT);
        client.functionLoadReplace(Matrix.LIBRARY);
        Matrix.step("change");

        Matrix.report("reads", () -> {
            // A fresh connection, which wrote nothing, reads what was written before the change.
            try (Jedis reader = new Jedis(uri)) {
                Set<String> answers = new TreeSet<>();
                for (int i = 0; i < 20; i++) {
                    answers.add(reader.get("greeting") + " " + new TreeMap<>(reader.hgetAll("profile")));
                }
                return answers;
            }
        });
        Matrix.report("connect", () -> {
            try (Jedis other = new Jedis(uri)) {
                return List.of(other.ping(), client.set("k", "v"), client.get("k"));
            }
        });
        Matrix.report("pipeline", () -> {
            Pipeline pipeline = client.pipelined();
            for (int i = 0; i < 100; i++) {
                pipeline.incr("counter");
            }
            pipeline.get("counter");
            List<Object> replies = pipeline.syncAndReturnAll();
            return replies.subList(replies.size() - 2, replies.size());
        });
        Matrix.report("watched-transaction", () -> {
            List<Object> results = new ArrayList<>();
            client.watch("balance");
            String balance = client.get("balance");
            Transaction transaction = client.multi();
            transaction.set("balance", String.valueOf((balance == null ? 0 : Integer.parseInt(balance)) + 10));
            transaction.get("balance");
            results.add(transaction.exec());
            client.watch("balance");
            try (Jedis other = new Jedis(uri)) {
                other.set("balance", "0");
            }
            transaction = client.multi();
            transaction.set("balance", "99");
            results.add(transaction.exec());
            results.add(client.get("balance"));
            return results;
        });
        Matrix.report("pipelined-transaction", () -> {
            Transaction transaction = client.multi();
            transaction.incr("txn");
            transaction.incr("txn");
            transaction.get("txn");
            return transaction.exec();
        });
        Matrix.report("pubsub-reconnect", JedisMatrix::pubsubWithReconnect);
        Matrix.report("blocking-pops", () -> {
            new Thread(() -> {
                Matrix.sleep(100);
                try (Jedis pusher = new Jedis(uri)) {
                    pusher.rpush("queue", "job");
                }
            }).start();
            return java.util.Arrays.asList(client.blpop(5.0, "queue"), client.blpop(0.1, "empty"));
        });
        Matrix.report("resp3", () -> {
            try (Jedis resp3 = new Jedis(hostAndPort(), DefaultJedisClientConfig.builder().protocol(RedisProtocol.RESP3).build())) {
                resp3.hset("hash", java.util.Map.of("a", "1", "b", "2"));
                resp3.zadd("zset", 1.5, "m");
                return List.of(new TreeMap<>(resp3.hgetAll("hash")), resp3.zrangeWithScores("zset", 0, -1));
            }
        });
        Matrix.report("connection-pool", () -> {
            JedisPoolConfig config = new JedisPoolConfig();
            config.setMaxTotal(4);
            try (JedisPool pool = new JedisPool(config, uri)) {
                Matrix.concurrently(8, () -> {
                    for (int i = 0; i < 50; i++) {
                        try (Jedis pooled = pool.getResource()) {
                            pooled.incr("pooled");
                        }
                    }
                });
                try (Jedis pooled = pool.getResource()) {
                    return pooled.get("pooled");
                }
            }
        });
        Matrix.report("evalsha", () -> List.of(client.evalsha(sha, 1, "scripted", "5"), client.evalsha(sha, 1, "scripted", "5")));
        Matrix.report("fcall", () -> {
            List<String> keys = List.of("bumped");
            return List.of(client.fcall("bump", keys, List.of("3")), client.fcall("bump", keys, List.of("3")));
        });
        System.out.println("done");
        System.exit(0);
    }

    private static HostAndPort hostAndPort() {
        return new HostAndPort(uri.getHost(), uri.getPort());
    }

    /** Subscribes on a thread of its own, subscribing again on a new connection when it drops. */
    private static Object pubsubWithReconnect() throws Exception {
        Set<String> received = ConcurrentHashMap.newKeySet();
        JedisPubSub[] current = new JedisPubSub[1];
        Thread subscriber = new Thread(() -> {
            while (!Thread.currentThread().isInterrupted()) {
                JedisPubSub listener = new JedisPubSub() {
                    @Override
                    public void onMessage(String channel, String message) {
                        received.add(message);
                    }
                };
                current[0] = listener;
                try (Jedis connection = new Jedis(uri)) {
                    connection.subscribe(listener, "news");
                    return; // unsubscribed
                } catch (JedisConnectionException dropped) {
                    Matrix.sleep(50);
                }
            }
        });
        subscriber.start();
        List<String> result = new ArrayList<>();
        try (Jedis publisher = new Jedis(uri)) {
            result.add(Matrix.receive(received, "first", text -> publisher.publish("news", text)));
            Matrix.step("drop-subscribers");
            result.add(Matrix.receive(received, "again", text -> publisher.publish("news", text)));
        }
        current[0].unsubscribe();
        subscriber.join();
        return result;
    }
}
