// go-redis's scenarios of the client matrix (sidecar/tests/clients.rs): one line per result.
// The lock is redsync's (Redlock on go-redis). No client-side caching: go-redis has none.
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/go-redsync/redsync/v4"
	"github.com/go-redsync/redsync/v4/redis/goredis/v9"
	"github.com/redis/go-redis/v9"
)

var (
	ctx   = context.Background()
	url   = os.Args[1]
	input = bufio.NewReader(os.Stdin)
)

func connect(configure func(*redis.Options)) *redis.Client {
	options, err := redis.ParseURL(url)
	if err != nil {
		panic(err)
	}
	if configure != nil {
		configure(options)
	}
	return redis.NewClient(options)
}

func step(what string) {
	fmt.Println("step", what)
	if _, err := input.ReadString('\n'); err != nil {
		panic(err)
	}
}

func report(name string, scenario func() (any, error)) {
	result, err := scenario()
	if err != nil {
		fmt.Println(name, "error", err)
		return
	}
	fmt.Println(name, result)
}

func main() {
	client := connect(nil)
	// Written, loaded and taken before the state change, read and run after it.
	if err := client.Set(ctx, "greeting", "hello", 0).Err(); err != nil {
		panic(err)
	}
	if err := client.HSet(ctx, "profile", "name", "eden", "kind", "proxy").Err(); err != nil {
		panic(err)
	}
	sha, err := client.ScriptLoad(ctx, "return redis.call('INCRBY', KEYS[1], ARGV[1])").Result()
	if err != nil {
		panic(err)
	}
	library := "#!lua name=matrix\n" +
		"redis.register_function('bump', function(keys, args) return redis.call('INCRBY', keys[1], args[1]) end)"
	if err := client.FunctionLoadReplace(ctx, library).Err(); err != nil {
		panic(err)
	}
	mutex := redsync.New(goredis.NewPool(client)).NewMutex("lock", redsync.WithExpiry(10*time.Second), redsync.WithTries(1))
	acquired := mutex.Lock()
	step("change")

	report("reads", func() (any, error) {
		// A fresh connection, which wrote nothing, reads what was written before the change.
		reader := connect(nil)
		answers := map[string]bool{}
		for range 20 {
			greeting, err := reader.Get(ctx, "greeting").Result()
			if err != nil {
				return nil, err
			}
			profile, err := reader.HGetAll(ctx, "profile").Result()
			if err != nil {
				return nil, err
			}
			answers[fmt.Sprint(greeting, profile)] = true
		}
		return answers, nil
	})
	report("connect", func() (any, error) {
		if err := connect(nil).Ping(ctx).Err(); err != nil {
			return nil, err
		}
		if err := client.Set(ctx, "k", "v", 0).Err(); err != nil {
			return nil, err
		}
		return client.Get(ctx, "k").Result()
	})
	report("pipeline", func() (any, error) {
		commands, err := client.Pipelined(ctx, func(pipe redis.Pipeliner) error {
			for range 100 {
				pipe.Incr(ctx, "counter")
			}
			pipe.Get(ctx, "counter")
			return nil
		})
		return commands[len(commands)-2:], err
	})
	report("watched-transaction", func() (any, error) {
		var results []any
		err := client.Watch(ctx, func(tx *redis.Tx) error {
			balance, err := tx.Get(ctx, "balance").Int()
			if err != nil && !errors.Is(err, redis.Nil) {
				return err
			}
			commands, err := tx.TxPipelined(ctx, func(pipe redis.Pipeliner) error {
				pipe.Set(ctx, "balance", balance+10, 0)
				pipe.Get(ctx, "balance")
				return nil
			})
			results = append(results, commands)
			return err
		}, "balance")
		if err != nil {
			return nil, err
		}
		err = client.Watch(ctx, func(tx *redis.Tx) error {
			if err := connect(nil).Set(ctx, "balance", 0, 0).Err(); err != nil {
				return err
			}
			_, err := tx.TxPipelined(ctx, func(pipe redis.Pipeliner) error {
				pipe.Set(ctx, "balance", 99, 0)
				return nil
			})
			return err
		}, "balance")
		results = append(results, err)
		balance, err := client.Get(ctx, "balance").Result()
		return append(results, balance), err
	})
	report("pipelined-transaction", func() (any, error) {
		return client.TxPipelined(ctx, func(pipe redis.Pipeliner) error {
			pipe.Incr(ctx, "txn")
			pipe.Incr(ctx, "txn")
			pipe.Get(ctx, "txn")
			return nil
		})
	})
	report("pubsub-reconnect", func() (any, error) {
		pubsub := client.Subscribe(ctx, "news")
		defer pubsub.Close()
		if _, err := pubsub.Receive(ctx); err != nil {
			return nil, err
		}
		received := []string{receive(client, pubsub, "first")}
		step("drop-subscribers")
		return append(received, receive(client, pubsub, "again")), nil
	})
	report("blocking-pops", func() (any, error) {
		go func() {
			time.Sleep(100 * time.Millisecond)
			connect(nil).RPush(ctx, "queue", "job")
		}()
		popped, err := client.BLPop(ctx, 5*time.Second, "queue").Result()
		if err != nil {
			return nil, err
		}
		_, err = client.BLPop(ctx, time.Second, "empty").Result()
		return []any{popped, err}, nil
	})
	report("resp3", func() (any, error) {
		resp3 := connect(func(options *redis.Options) { options.Protocol = 3 })
		if err := resp3.HSet(ctx, "hash", "a", "1", "b", "2").Err(); err != nil {
			return nil, err
		}
		if err := resp3.ZAdd(ctx, "zset", redis.Z{Score: 1.5, Member: "m"}).Err(); err != nil {
			return nil, err
		}
		hash, err := resp3.HGetAll(ctx, "hash").Result()
		if err != nil {
			return nil, err
		}
		zset, err := resp3.ZRangeWithScores(ctx, "zset", 0, -1).Result()
		return []any{hash, zset}, err
	})
	report("connection-pool", func() (any, error) {
		pooled := connect(func(options *redis.Options) { options.PoolSize = 4 })
		var workers sync.WaitGroup
		for range 8 {
			workers.Add(1)
			go func() {
				defer workers.Done()
				for range 50 {
					pooled.Incr(ctx, "pooled")
				}
			}()
		}
		workers.Wait()
		return pooled.Get(ctx, "pooled").Result()
	})
	report("evalsha", func() (any, error) {
		first, err := client.EvalSha(ctx, sha, []string{"scripted"}, 5).Result()
		if err != nil {
			return nil, err
		}
		second, err := client.EvalSha(ctx, sha, []string{"scripted"}, 5).Result()
		return []any{first, second}, err
	})
	report("fcall", func() (any, error) {
		first, err := client.FCall(ctx, "bump", []string{"bumped"}, 3).Result()
		if err != nil {
			return nil, err
		}
		second, err := client.FCall(ctx, "bump", []string{"bumped"}, 3).Result()
		return []any{first, second}, err
	})
	report("lock", func() (any, error) {
		extended, err := mutex.Extend()
		if err != nil {
			return nil, err
		}
		released, err := mutex.Unlock()
		if err != nil {
			return nil, err
		}
		left, err := client.Exists(ctx, "lock").Result()
		return []any{acquired, extended, released, left}, err
	})
	fmt.Println("done")
}

// receive publishes text until the subscriber gets it (it may be reconnecting).
func receive(client *redis.Client, pubsub *redis.PubSub, text string) string {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		client.Publish(ctx, "news", text)
		for {
			message, err := pubsub.ReceiveTimeout(ctx, 100*time.Millisecond)
			if err != nil {
				break // a timeout, or a closed connection the next call reconnects
			}
			if message, ok := message.(*redis.Message); ok && message.Payload == text {
				return text
			}
		}
	}
	return "no " + text
}
