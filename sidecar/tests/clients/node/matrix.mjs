// node-redis's scenarios of the client matrix (sidecar/tests/clients.rs): one line per result.
// No lock: node-redis has none.
import { createInterface } from 'node:readline';
import { createClient, createClientPool } from 'redis';

const url = process.argv[2];
const input = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function connect(options = {}) {
  // Errors surface in the commands that meet them; the client reconnects by itself.
  return createClient({ url, ...options }).on('error', () => {}).connect();
}

async function step(what) {
  console.log('step', what);
  await input.next();
}

async function report(name, scenario) {
  let result;
  try {
    result = JSON.stringify(await scenario());
  } catch (error) {
    result = `error ${error.constructor.name}: ${error.message}`;
  }
  console.log(name, result);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const client = await connect();

async function reads() {
  // A fresh connection, which wrote nothing, reads what was written before the state change.
  const reader = await connect();
  const answers = new Set();
  for (let i = 0; i < 20; i++) {
    answers.add(JSON.stringify([await reader.get('greeting'), await reader.hGetAll('profile')]));
  }
  reader.destroy();
  return [...answers];
}

async function watchedTransaction() {
  const results = [];
  const own = await connect();
  await own.watch('balance');
  const balance = Number(await own.get('balance'));
  results.push(await own.multi().set('balance', String(balance + 10)).get('balance').exec());
  await own.watch('balance');
  await client.set('balance', '0');
  try {
    results.push(await own.multi().set('balance', '99').exec());
  } catch (error) {
    results.push(error.constructor.name);
  }
  results.push(await own.get('balance'));
  own.destroy();
  return results;
}

async function receive(subscriber, received, text) {
  // Publishes until the subscriber gets it (it may be reconnecting).
  for (let i = 0; i < 50 && !received.has(text); i++) {
    await client.publish('news', text);
    await sleep(100);
  }
  return received.has(text) ? text : `no ${text}`;
}

async function pubsubWithReconnect() {
  const subscriber = await connect();
  const received = new Set();
  await subscriber.subscribe('news', (message) => received.add(message));
  const result = [await receive(subscriber, received, 'first')];
  await step('drop-subscribers');
  result.push(await receive(subscriber, received, 'again'));
  subscriber.destroy();
  return result;
}

async function blockingPops() {
  const blocking = await connect();
  setTimeout(() => client.rPush('queue', 'job'), 100);
  const result = [await blocking.blPop('queue', 5), await blocking.blPop('empty', 0.1)];
  blocking.destroy();
  return result;
}

async function resp3() {
  const resp3Client = await connect({ RESP: 3 });
  await resp3Client.hSet('hash', { a: '1', b: '2' });
  await resp3Client.zAdd('zset', { score: 1.5, value: 'm' });
  const result = [await resp3Client.hGetAll('hash'), await resp3Client.zRangeWithScores('zset', 0, -1)];
  resp3Client.destroy();
  return result;
}

async function clientSideCaching() {
  const cached = await connect({ RESP: 3, clientSideCache: { ttl: 0, maxEntries: 0, evictPolicy: 'LRU' } });
  await cached.set('cached', '1');
  const seen = [await cached.get('cached'), await cached.get('cached'), cached.clientSideCache.stats().hitCount];
  await client.set('cached', '2');
  for (let i = 0; i < 200 && (await cached.get('cached')) !== '2'; i++) {
    await sleep(10);
  }
  seen.push(await cached.get('cached'));
  cached.destroy();
  return seen;
}

async function connectionPool() {
  const pool = await createClientPool({ url }, { minimum: 1, maximum: 4 }).on('error', () => {}).connect();
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      for (let i = 0; i < 50; i++) await pool.incr('pooled');
    }),
  );
  const total = await pool.get('pooled');
  pool.destroy();
  return total;
}

// Written and loaded before the state change, read and run after it.
await client.set('greeting', 'hello');
await client.hSet('profile', { name: 'eden', kind: 'proxy' });
const sha = await client.scriptLoad("return redis.call('INCRBY', KEYS[1], ARGV[1])");
await client.functionLoad(
  "#!lua name=matrix\nredis.register_function('bump', function(keys, args) return redis.call('INCRBY', keys[1], args[1]) end)",
  { REPLACE: true },
);
await step('change');

await report('reads', reads);
await report('connect', async () => [await (await connect()).ping(), await client.set('k', 'v'), await client.get('k')]);
await report('pipeline', async () => {
  const pipeline = client.multi();
  for (let i = 0; i < 100; i++) pipeline.incr('counter');
  return (await pipeline.get('counter').execAsPipeline()).slice(-2);
});
await report('watched-transaction', watchedTransaction);
await report('pipelined-transaction', () => client.multi().incr('txn').incr('txn').get('txn').exec());
await report('pubsub-reconnect', pubsubWithReconnect);
await report('blocking-pops', blockingPops);
await report('resp3', resp3);
await report('client-side-caching', clientSideCaching);
await report('connection-pool', connectionPool);
const evalSha = () => client.evalSha(sha, { keys: ['scripted'], arguments: ['5'] });
await report('evalsha', async () => [await evalSha(), await evalSha()]);
const fCall = () => client.fCall('bump', { keys: ['bumped'], arguments: ['3'] });
await report('fcall', async () => [await fCall(), await fCall()]);
console.log('done');
process.exit(0);
