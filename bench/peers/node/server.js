'use strict';
// Reference peer for the benchmark: the usual socket.io 4 + Redis adapter server,
// speaking the part of scalechat's protocol the benchmark uses (docs/protocol.md):
// POST /api/session, GET /healthz, and the `join` / `message` events with acks.
// Messages are broadcast to the room with an id; nothing is stored.
// GET /metrics counts the pub/sub messages the worker's subscriber received.
//
// ADAPTER=classic (default): createAdapter, one pattern subscription, every worker hears
// every room. ADAPTER=sharded: createShardedAdapter, SSUBSCRIBE to each room the worker
// has members in (Redis 7), on one Redis or, with REDIS_URL=redis+cluster://[:pw@]h:p,h:p,
// on a Redis Cluster.
//
//   PORT=8101 REDIS_URL=redis://127.0.0.1:6379/0 WORKER_ID=n0 node server.js
//   ADAPTER=sharded REDIS_URL=redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001 node server.js

const http = require('node:http');
const { Server } = require('socket.io');
const { createClient, createCluster } = require('redis');
const { createAdapter, createShardedAdapter } = require('@socket.io/redis-adapter');

const host = process.env.HOST || '127.0.0.1';
const port = Number(process.env.PORT || 8101);
const redisUrl = process.env.REDIS_URL || 'redis://127.0.0.1:6379/0';
const workerId = process.env.WORKER_ID || `node-${process.pid}`;
const adapterKind = process.env.ADAPTER || 'classic';
const CLUSTER_SCHEME = 'redis+cluster://';

let pubsubMessages = 0;

const ROOM_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
const CLIENT_ID_RE = /^[A-Za-z0-9_.:-]{1,64}$/;

function sendJson(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) });
  res.end(data);
}

// Any token will do for the benchmark: the user name, encoded, so every worker can read it.
function issueToken(user) {
  return Buffer.from(JSON.stringify({ user })).toString('base64url');
}

function userOf(token) {
  if (typeof token !== 'string') return null;
  try {
    const user = JSON.parse(Buffer.from(token, 'base64url').toString('utf8')).user;
    return typeof user === 'string' && user.length > 0 ? user : null;
  } catch {
    return null;
  }
}

const httpServer = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/healthz') {
    sendJson(res, 200, { status: 'ok', worker: workerId });
    return;
  }
  if (req.method === 'GET' && req.url === '/metrics') {
    res.writeHead(200, { 'Content-Type': 'text/plain; version=0.0.4' });
    res.end(`bench_pubsub_messages_total{worker="${workerId}"} ${pubsubMessages}\n`);
    return;
  }
  if (req.method === 'POST' && req.url === '/api/session') {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => {
      body += chunk;
      if (body.length > 4096) req.destroy();
    });
    req.on('end', () => {
      let name;
      try {
        name = JSON.parse(body).name;
      } catch {
        name = undefined;
      }
      if (typeof name !== 'string' || name.trim() === '' || name.length > 32) {
        sendJson(res, 400, { error: 'invalid_name', detail: 'name must be 1-32 characters' });
        return;
      }
      name = name.trim();
      sendJson(res, 200, { token: issueToken(name), user: name });
    });
    return;
  }
  sendJson(res, 404, { error: 'not_found' });
});

const io = new Server(httpServer);

io.use((socket, next) => {
  const user = userOf(socket.handshake.auth && socket.handshake.auth.token);
  if (!user) {
    next(new Error('unauthorized'));
    return;
  }
  socket.data.user = user;
  next();
});

let seq = 0;

io.on('connection', (socket) => {
  socket.on('join', (data, ack) => {
    if (typeof ack !== 'function') return;
    const room = data && data.room;
    if (typeof room !== 'string' || !ROOM_RE.test(room)) {
      ack({ ok: false, error: 'invalid_room', detail: 'bad room name' });
      return;
    }
    socket.join(room);
    ack({ ok: true, room, history: [], missed_more: false, members: [], worker: workerId });
  });

  socket.on('message', (data, ack) => {
    if (typeof ack !== 'function') return;
    const room = data && data.room;
    const text = data && data.text;
    const clientId = data && data.client_id;
    if (typeof room !== 'string' || !ROOM_RE.test(room)) {
      ack({ ok: false, error: 'invalid_room', detail: 'bad room name' });
      return;
    }
    if (typeof text !== 'string' || text.trim() === '' || text.length > 2000) {
      ack({ ok: false, error: 'invalid_text', detail: 'bad text' });
      return;
    }
    if (typeof clientId !== 'string' || !CLIENT_ID_RE.test(clientId)) {
      ack({ ok: false, error: 'invalid_client_id', detail: 'bad client_id' });
      return;
    }
    if (!socket.rooms.has(room)) {
      ack({ ok: false, error: 'not_member', detail: `join ${room} before using it` });
      return;
    }
    const ts = Date.now();
    seq += 1;
    const id = `${ts}-${workerId}-${seq}`;
    io.to(room).emit('message', { id, room, user: socket.data.user, text, ts, client_id: clientId });
    ack({ ok: true, id });
  });
});

// Count every message the subscriber hands to the adapter, on any kind of subscription.
function countingSubscriber(client) {
  for (const method of ['subscribe', 'pSubscribe', 'sSubscribe']) {
    const original = client[method].bind(client);
    client[method] = (channels, listener, bufferMode) => original(channels, (...args) => {
      pubsubMessages += 1;
      return listener(...args);
    }, bufferMode);
  }
  return client;
}

// redis+cluster://[user:password@]host:port,host:port: the cluster's seed nodes.
function clusterOptions(url) {
  const rest = url.slice(CLUSTER_SCHEME.length).replace(/\/.*$/, '');
  const at = rest.lastIndexOf('@');
  const [username, password] = at < 0 ? ['', ''] : rest.slice(0, at).split(':');
  const hosts = at < 0 ? rest : rest.slice(at + 1);
  const defaults = {};
  if (username) defaults.username = decodeURIComponent(username);
  if (password) defaults.password = decodeURIComponent(password);
  return { rootNodes: hosts.split(',').map((h) => ({ url: `redis://${h}` })), defaults };
}

function redisClients() {
  if (redisUrl.startsWith(CLUSTER_SCHEME)) {
    if (adapterKind !== 'sharded') {
      throw new Error('a Redis Cluster needs ADAPTER=sharded');
    }
    const pubClient = createCluster(clusterOptions(redisUrl));
    return [pubClient, pubClient.duplicate()];
  }
  const pubClient = createClient({ url: redisUrl });
  return [pubClient, pubClient.duplicate()];
}

async function main() {
  if (adapterKind !== 'classic' && adapterKind !== 'sharded') {
    throw new Error(`ADAPTER must be classic or sharded, got ${adapterKind}`);
  }
  const [pubClient, subClient] = redisClients();
  pubClient.on('error', (err) => console.error(`${workerId}: redis pub: ${err.message}`));
  subClient.on('error', (err) => console.error(`${workerId}: redis sub: ${err.message}`));
  await Promise.all([pubClient.connect(), subClient.connect()]);
  countingSubscriber(subClient);
  const create = adapterKind === 'sharded' ? createShardedAdapter : createAdapter;
  io.adapter(create(pubClient, subClient));
  httpServer.listen(port, host, () => console.log(
    `${workerId} (${adapterKind} adapter) listening on http://${host}:${port}`));

  const stop = () => {
    io.close(() => {
      Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
    });
    setTimeout(() => process.exit(0), 3000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error(`${workerId}: ${err.stack || err}`);
  process.exit(1);
});
