// Socket.IO steps of chat.yml, run as Artillery `function` steps.
//
// Why not Artillery's built-in `socketio` engine: it opens the VU's connection
// before the first step of the flow runs, with options templated from the
// variables the VU starts with, so it cannot send the token that the VU gets
// from its own `POST /api/session`; scalechat refuses connections without one.
// These steps use socket.io-client v4 directly, with `auth: {token}`, and
// report what they see as Artillery metrics (named in README.md).
//
// A step that fails closes the VU's socket and throws: Artillery counts the
// error's message as `errors.<message>` and the VU as failed (vusers.failed).

'use strict';

const { io } = require('socket.io-client');

const CONNECT_TIMEOUT_MS = 10000;
const ACK_TIMEOUT_MS = 10000;
// How long `disconnect` waits for the broadcasts of the VU's own messages
// still on their way before it counts them as not delivered.
const DELIVERY_WAIT_MS = 5000;

function msSince(start) {
  const [s, ns] = process.hrtime(start);
  return s * 1e3 + ns / 1e6;
}

// Closes the socket and returns the error that fails the VU as `errors.<code>`.
function failure(context, code) {
  const chat = context.chat;
  if (chat) {
    chat.closing = true;
    chat.socket.disconnect();
  }
  return new Error(code);
}

// Emits `event` with `payload` and resolves to its `{"ok": true, ...}` ack;
// an `{"ok": false}` ack, no ack in time or a lost connection fails the VU.
async function request(context, events, event, payload) {
  const chat = context.chat;
  if (!chat) throw failure(context, `not_connected.${event}`);
  if (chat.lost) throw failure(context, `disconnected.${chat.lost}`);

  events.emit('counter', 'socketio.emit', 1);
  events.emit('rate', 'socketio.emit_rate');
  const started = process.hrtime();
  let ack;
  try {
    ack = await chat.socket.timeout(ACK_TIMEOUT_MS).emitWithAck(event, payload);
  } catch (err) {
    if (chat.lost) throw failure(context, `disconnected.${chat.lost}`);
    throw failure(context, `ack_timeout.${event}`);
  }
  const ms = msSince(started);
  if (!ack || ack.ok !== true) {
    events.emit('counter', 'socketio.acks.error', 1);
    const code = (ack && ack.error) || 'malformed_ack';
    throw failure(context, `ack_error.${event}.${code}`);
  }
  events.emit('counter', 'socketio.acks.ok', 1);
  events.emit('histogram', 'socketio.response_time', ms);
  events.emit('histogram', `socketio.response_time.${event}`, ms);
  return ack;
}

// Opens the VU's Socket.IO connection (websocket transport) with the token
// captured from `POST /api/session` in the Socket.IO v4 `auth` payload.
async function connect(context, events) {
  const started = process.hrtime();
  const socket = io(context.vars.target, {
    transports: ['websocket'],
    auth: { token: context.vars.token },
    forceNew: true,
    // A VU is one connection: a drop fails it instead of reconnecting.
    reconnection: false,
    timeout: CONNECT_TIMEOUT_MS,
  });
  const chat = {
    socket,
    lost: null,          // why the server side closed the connection, if it did
    closing: false,      // true once the VU closes it itself
    sent: new Map(),     // client_id -> hrtime of the emit, until its broadcast comes back
    seen: new Set(),     // ids of the `message` events received
    duplicates: 0,
    sequence: 0,
  };
  context.chat = chat;

  socket.on('message', (msg) => {
    if (!msg) return;
    events.emit('counter', 'chat.messages_received', 1);
    if (chat.seen.has(msg.id)) chat.duplicates += 1;
    chat.seen.add(msg.id);
    const sentAt = chat.sent.get(msg.client_id);
    if (sentAt) {
      chat.sent.delete(msg.client_id);
      events.emit('histogram', 'chat.delivery_time', msSince(sentAt));
    }
  });

  try {
    await new Promise((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('connect_error', reject);
    });
  } catch (err) {
    throw failure(context, `connect_error.${err.message}`);
  }
  socket.on('disconnect', (reason) => {
    if (!chat.closing) chat.lost = reason;
  });
  events.emit('counter', 'socketio.connected', 1);
  events.emit('histogram', 'socketio.connect_time', msSince(started));
}

async function joinRoom(context, events) {
  const ack = await request(context, events, 'join', { room: context.vars.room });
  if (Array.isArray(ack.members)) {
    events.emit('histogram', 'chat.join.members', ack.members.length);
  }
}

async function sendMessage(context, events) {
  const chat = context.chat;
  chat.sequence += 1;
  // Unique per message: the server treats a repeated client_id as a re-send.
  const clientId = `${context._uid}:${chat.sequence}`;
  const started = process.hrtime();
  chat.sent.set(clientId, started);
  await request(context, events, 'message', {
    room: context.vars.room,
    text: `load message ${chat.sequence} from ${context.vars.user}`,
    client_id: clientId,
  });
  events.emit('counter', 'chat.messages_sent', 1);
}

// Waits for the broadcasts of the VU's own messages, then disconnects.
async function disconnect(context, events) {
  const chat = context.chat;
  const deadline = Date.now() + DELIVERY_WAIT_MS;
  while (chat.sent.size > 0 && !chat.lost && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  if (chat.lost) throw failure(context, `disconnected.${chat.lost}`);
  if (chat.sent.size > 0) {
    events.emit('counter', 'chat.messages_not_delivered', chat.sent.size);
    throw failure(context, 'own_message_not_delivered');
  }
  if (chat.duplicates > 0) {
    events.emit('counter', 'chat.messages_duplicated', chat.duplicates);
    throw failure(context, 'duplicate_message_delivered');
  }
  chat.closing = true;
  chat.socket.disconnect();
}

module.exports = { connect, joinRoom, sendMessage, disconnect };
