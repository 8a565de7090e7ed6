package eden;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;
import java.util.TreeSet;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.TimeUnit;
import java.util.function.Consumer;

import io.lettuce.core.ClientOptions;
import io.lettuce.core.RedisClient;
import io.lettuce.core.RedisFuture;
import io.lettuce.core.ScriptOutputType;
import io.lettuce.core.TrackingArgs;
import io.lettuce.core.TransactionResult;
import io.lettuce.core.api.StatefulRedisConnection;
import io.lettuce.core.api.async.RedisAsyncCommands;
import io.lettuce.core.api.sync.RedisCommands;
import io.lettuce.core.protocol.ProtocolVersion;
import io.lettuce.core.pubsub.RedisPubSubAdapter;
import io.lettuce.core.pubsub.StatefulRedisPubSubConnection;
import io.lettuce.core.support.ConnectionPoolSupport;
import io.lettuce.core.support.caching.CacheAccessor;
import io.lettuce.core.support.caching.CacheFrontend;
import io.lettuce.core.support.caching.ClientSideCaching;
import org.apache.commons.pool2.impl.GenericObjectPool;
import org.apache.commons.pool2.impl.GenericObjectPoolConfig;

/** Lettuce's scenarios of the client matrix: one line per result. Lettuce has no lock of its own. */
public final class LettuceMatrix {
    private static RedisClient redis;

    public static void main(String[] args) throws Exception {
        redis = RedisClient.create(args[0]);
        RedisCommands<String, String> client = redis.connect().sync();
        // Written and loaded before the state change, read and run after it.
        client.set("greeting", "hello");
        client.hset("profile", Map.of("name", "eden", "kind", "proxy"));
        String sha = client.scriptLoad(Matrix.SCRIPT);
        client.functionLoad(Matrix.LIBRARY, true);
        Matrix.step("change");

        Matrix.report("reads", () -> {
            // A fresh connection, which wrote nothing, reads what was written before the change.
            try (StatefulRedisConnection<String, String> reader = redis.connect()) {
                Set<String> answers = new TreeSet<>();
                for (int i = 0; i < 20; i++) {
                    answers.add(reader.sync().get("greeting") + " " + new TreeMap<>(reader.sync().hgetall("profile")));
                }
                return answers;
            }
        });
        Matrix.report("connect", () -> {
            try (StatefulRedisConnection<String, String> other = redis.connect()) {
                return List.of(other.sync().ping(), client.set("k", "v"), client.get("k"));
            }
        });
        Matrix.report("pipeline", () -> {
            try (StatefulRedisConnection<String, String> connection = redis.connect()) {
                connection.setAutoFlushCommands(false);
                RedisAsyncCommands<String, String> pipeline = connection.async();
                List<RedisFuture<?>> replies = new ArrayList<>();
                for (int i = 0; i < 100; i++) {
                    replies.add(pipeline.incr("counter"));
                }
                replies.add(pipeline.get("counter"));
                connection.flushCommands();
                List<Object> last = new ArrayList<>();
                for (RedisFuture<?> reply : replies.subList(replies.size() - 2, replies.size())) {
                    last.add(reply.get(10, TimeUnit.SECONDS));
                }
                return last;
            }
        });
        Matrix.report("watched-transaction", () -> {
            try (StatefulRedisConnection<String, String> connection = redis.connect()) {
                RedisCommands<String, String> own = connection.sync();
                List<Object> results = new ArrayList<>();
                own.watch("balance");
                String balance = own.get("balance");
                own.multi();
                own.set("balance", String.valueOf((balance == null ? 0 : Integer.parseInt(balance)) + 10));
                own.get("balance");
                results.add(outcome(own.exec()));
                own.watch("balance");
                client.set("balance", "0");
                own.multi();
                own.set("balance", "99");
                results.add(outcome(own.exec()));
                results.add(own.get("balance"));
                return results;
            }
        });
        Matrix.report("pipelined-transaction", () -> {
            try (StatefulRedisConnection<String, String> connection = redis.connect()) {
                RedisAsyncCommands<String, String> async = connection.async();
                async.multi();
                async.incr("txn");
                async.incr("txn");
                async.get("txn");
                return outcome(async.exec().get(10, TimeUnit.SECONDS));
            }
        });
        Matrix.report("pubsub-reconnect", () -> {
            Set<String> received = ConcurrentHashMap.newKeySet();
            try (StatefulRedisPubSubConnection<String, String> subscriber = redis.connectPubSub()) {
                subscriber.addListener(new RedisPubSubAdapter<>() {
                    @Override
                    public void message(String channel, String message) {
                        received.add(message);
                    }
                });
                subscriber.sync().subscribe("news");
                Consumer<String> publish = text -> client.publish("news", text);
                List<String> result = new ArrayList<>(List.of(Matrix.receive(received, "first", publish)));
                Matrix.step("drop-subscribers");
                result.add(Matrix.receive(received, "again", publish));
                return result;
            }
        });
        Matrix.report("blocking-pops", () -> {
            try (StatefulRedisConnection<String, String> blocking = redis.connect()) {
                new Thread(() -> {
                    Matrix.sleep(100);
                    client.rpush("queue", "job");
                }).start();
                return java.util.Arrays.asList(blocking.sync().blpop(5.0, "queue"), blocking.sync().blpop(0.1, "empty"));
            }
        });
        Matrix.report("resp3", () -> {
            RedisClient resp3Client = RedisClient.create(args[0]);
            resp3Client.setOptions(ClientOptions.builder().protocolVersion(ProtocolVersion.RESP3).build());
            try (StatefulRedisConnection<String, String> resp3 = resp3Client.connect()) {
                resp3.sync().hset("hash", Map.of("a", "1", "b", "2"));
                resp3.sync().zadd("zset", 1.5, "m");
                return List.of(new TreeMap<>(resp3.sync().hgetall("hash")), resp3.sync().zrangeWithScores("zset", 0, -1));
            } finally {
                resp3Client.shutdown();
            }
        });
        Matrix.report("client-side-caching", () -> {
            try (StatefulRedisConnection<String, String> connection = redis.connect()) {
                Map<String, String> store = new ConcurrentHashMap<>();
                CacheFrontend<String, String> cached =
                        ClientSideCaching.enable(CacheAccessor.forMap(store), connection, TrackingArgs.Builder.enabled());
                connection.sync().set("cached", "1");
                List<Object> seen = new ArrayList<>(List.of(cached.get("cached"), cached.get("cached"), store.size()));
                client.set("cached", "2");
                for (int i = 0; i < 200 && !"2".equals(cached.get("cached")); i++) {
                    Matrix.sleep(10);
                }
                seen.add(cached.get("cached"));
                return seen;
            }
        });
        Matrix.report("connection-pool", () -> {
            GenericObjectPoolConfig<StatefulRedisConnection<String, String>> config = new GenericObjectPoolConfig<>();
            config.setMaxTotal(4);
            try (GenericObjectPool<StatefulRedisConnection<String, String>> pool =
                    ConnectionPoolSupport.createGenericObjectPool(redis::connect, config)) {
                Matrix.concurrently(8, () -> {
                    for (int i = 0; i < 50; i++) {
                        try (StatefulRedisConnection<String, String> pooled = pool.borrowObject()) {
                            pooled.sync().incr("pooled");
                        } catch (Exception error) {
                            throw new IllegalStateException(error);
                        }
                    }
                });
            }
            return client.get("pooled");
        });
        Matrix.report("evalsha", () -> {
            String[] keys = {"scripted"};
            return List.of(client.evalsha(sha, ScriptOutputType.INTEGER, keys, "5"),
                    client.evalsha(sha, ScriptOutputType.INTEGER, keys, "5"));
        });
        Matrix.report("fcall", () -> {
            String[] keys = {"bumped"};
            return List.of(client.fcall("bump", ScriptOutputType.INTEGER, keys, "3"),
                    client.fcall("bump", ScriptOutputType.INTEGER, keys, "3"));
        });
        System.out.println("done");
        System.exit(0);
    }

    private static Object outcome(TransactionResult result) {
        return result.wasDiscarded() ? "discarded" : result.stream().toList();
    }
}
