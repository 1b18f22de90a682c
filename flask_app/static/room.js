// A room page: live messages in stream order, history on join, members, typing.
// After a reconnect it re-joins from the last message seen, so nothing is missed, and
// re-sends unacknowledged messages with their client_id, so nothing is doubled.
(function () {
  "use strict";
  const room = document.body.dataset.room;
  const me = document.body.dataset.userId; // users are told apart by id: names may repeat
  const list = document.getElementById("messages");
  const members = document.getElementById("members");
  const status = document.getElementById("status");
  const typing = document.getElementById("typing");
  const errorBox = document.getElementById("error");
  const form = document.getElementById("send");
  const input = document.getElementById("text");

  const seen = new Set();
  const pending = new Map(); // client_id -> payload, until the server acknowledges it
  const online = new Map(); // user id -> display name, of the users shown
  let onlineCount = 0; // users online in the room, shown or not (a join lists the first page)
  const typists = new Map(); // user id -> {name, timer}
  let lastTyping = 0;
  let lastId = null; // the newest message id shown: where a re-join resumes

  const socket = io({ transports: ["websocket", "polling"] });

  function compareIds(a, b) {
    const [am, as] = a.split("-").map(BigInt);
    const [bm, bs] = b.split("-").map(BigInt);
    if (am !== bm) return am < bm ? -1 : 1;
    return as === bs ? 0 : as < bs ? -1 : 1;
  }

  function showMessage(msg) {
    if (seen.has(msg.id)) return;
    seen.add(msg.id);
    if (lastId === null || compareIds(msg.id, lastId) > 0) lastId = msg.id;
    const item = document.createElement("li");
    item.dataset.id = msg.id;
    item.className = msg.user_id === me ? "mine" : "";
    const who = document.createElement("span");
    who.className = "user";
    who.textContent = msg.user;
    const when = document.createElement("time");
    when.dateTime = new Date(msg.ts).toISOString();
    when.textContent = new Date(msg.ts).toLocaleTimeString();
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = msg.text;
    item.append(who, when, text);
    let next = null;
    for (let node = list.lastElementChild; node; node = node.previousElementSibling) {
      if (compareIds(node.dataset.id, msg.id) < 0) break;
      next = node;
    }
    list.insertBefore(item, next);
    if (!next) list.scrollTop = list.scrollHeight;
  }

  function showMembers() {
    const sorted = [...online].sort(([aId, aName], [bId, bName]) =>
      aName.localeCompare(bName) || (aId < bId ? -1 : aId > bId ? 1 : 0));
    const items = sorted.map(([id, name]) => {
      const item = document.createElement("li");
      item.textContent = name;
      item.title = id;
      if (id === me) item.className = "me";
      return item;
    });
    if (onlineCount > online.size) {
      const more = document.createElement("li");
      more.className = "more";
      more.textContent = "and " + (onlineCount - online.size) + " more";
      items.push(more);
    }
    members.replaceChildren(...items);
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  function showTyping() {
    const names = [...typists.values()].map((typist) => typist.name);
    typing.textContent = names.length ? names.join(", ") + (names.length > 1 ? " are" : " is") + " typing…" : "";
  }

  function send(payload) {
    socket.timeout(10000).emit("message", payload, (err, ack) => {
      if (err) return; // no answer: resent after the next join
      if (ack.ok) {
        pending.delete(payload.client_id);
      } else if (ack.error === "busy") {
        // nothing was stored: send again once the server has caught up, spread out
        setTimeout(() => send(payload), 1000 + Math.random() * 1000);
      } else if (ack.error === "unavailable") {
        showError("The chat is briefly unavailable; your message will be retried.");
      } else {
        pending.delete(payload.client_id);
        showError(ack.detail || ack.error);
      }
    });
  }

  // Page forward through history until caught up, then call done.
  function loadAfter(after, done) {
    socket.emit("history", { room, after, limit: 200 }, (ack) => {
      if (!ack.ok) { showError(ack.detail || ack.error); return done(); }
      ack.messages.forEach(showMessage);
      if (ack.messages.length === 200) loadAfter(ack.messages[199].id, done); else done();
    });
  }

  const join = () => {
    socket.emit("join", lastId === null ? { room } : { room, since: lastId }, (ack) => {
      if (!ack.ok && ack.error === "invalid_cursor" && lastId !== null) {
        lastId = null; // the room's history is not the one this page saw: start from its end
        return join();
      }
      if (!ack.ok) {
        showError(ack.detail || ack.error);
        return;
      }
      ack.history.forEach(showMessage);
      online.clear();
      ack.members.forEach((member) => online.set(member.id, member.name));
      onlineCount = ack.online;
      showMembers();
      const resend = () => pending.forEach(send);
      if (ack.missed_more && ack.history.length) loadAfter(ack.history[ack.history.length - 1].id, resend);
      else resend();
    });
  };
  socket.on("connect", () => {
    status.textContent = "online";
    join();
  });
  socket.on("disconnect", () => { status.textContent = "reconnecting…"; });
  socket.on("connect_error", (err) => {
    status.textContent = "offline: " + err.message + (err.data && err.data.detail ? " (" + err.data.detail + ")" : "");
  });

  socket.on("message", (msg) => {
    if (msg.room !== room) return;
    showMessage(msg);
    const typist = typists.get(msg.user_id);
    if (typist) { clearTimeout(typist.timer); typists.delete(msg.user_id); showTyping(); }
  });
  socket.on("announcement", (event) => {
    if (event.room && event.room !== room) return;
    const item = document.createElement("li");
    item.className = "announcement";
    item.dataset.id = lastId || "0-0";
    item.textContent = "📣 " + event.text;
    list.append(item);
    list.scrollTop = list.scrollHeight;
  });
  socket.on("presence", (event) => {
    if (event.room !== room) return;
    if (event.state === "join") {
      if (!online.has(event.user_id)) onlineCount += 1;
      online.set(event.user_id, event.user);
    } else {
      onlineCount = Math.max(onlineCount - 1, 0);
      online.delete(event.user_id);
    }
    showMembers();
  });
  socket.on("online", (event) => {
    // a large room tells its count, not who came or went: the list keeps its first page
    if (event.room !== room) return;
    onlineCount = event.online;
    showMembers();
  });
  socket.on("typing", (event) => {
    if (event.room !== room || event.user_id === me) return;
    const typist = typists.get(event.user_id);
    if (typist) clearTimeout(typist.timer);
    typists.set(event.user_id, {
      name: event.user,
      timer: setTimeout(() => { typists.delete(event.user_id); showTyping(); }, 3000),
    });
    showTyping();
  });

  input.addEventListener("input", () => {
    const now = Date.now();
    if (socket.connected && now - lastTyping > 2000) {
      lastTyping = now;
      socket.emit("typing", { room });
    }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text.trim()) return;
    const payload = { room, text, client_id: Date.now().toString(36) + "-" + Math.random().toString(36).slice(2) };
    pending.set(payload.client_id, payload);
    input.value = "";
    showError("");
    if (socket.connected) send(payload);
  });
})();
