// Peer 6: Node.js with the `ws` package, one process per worker via `cluster`.
//
//   node server.js [--host 127.0.0.1] [--port 0] [--api-port 0] [--workers N] [--backlog 4096]
//
// ws's own idiom: a WebSocketServer per worker, per-connection state as properties
// on the socket, and a fan-out that calls `client.send(data)` on each open subscriber.
// The cluster primary shares the listening port with the workers (it accepts and
// hands connections out round-robin, Node's default on Linux) and relays publishes:
// a client's `pub` goes to the primary over the cluster IPC channel, the primary
// numbers it, encodes the event once and sends it to every worker, and each worker
// sends it to its own subscribers. The primary also serves POST /api/publish.
// Prints one JSON line once every worker listens: {"port", "api_port", "workers"}.
"use strict";
const cluster = require("node:cluster");
const http = require("node:http");
const os = require("node:os");

function flag(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}
const host = flag("host", "127.0.0.1");
const port = Number(flag("port", "0"));
const apiPort = Number(flag("api-port", "0"));
const workers = Number(flag("workers", String(os.availableParallelism())));
const backlog = Number(flag("backlog", "4096"));

if (cluster.isPrimary) {
  primary();
} else {
  worker();
}

function primary() {
  const seqs = new Map(); // channel (or "" for broadcasts) -> last seq
  let stopping = false;
  let listening = 0;
  let boundPort = 0;
  let api = null;

  // One encoding per publish, then the same string to each worker.
  function publish(channel, from, data) {
    const key = channel === null ? "" : channel;
    const seq = (seqs.get(key) || 0) + 1;
    seqs.set(key, seq);
    const ev = channel === null
      ? { ev: "broadcast", seq, from, data }
      : { ev: "msg", channel, seq, from, data };
    const line = JSON.stringify(ev);
    for (const w of Object.values(cluster.workers)) w.send({ c: channel, l: line });
    return seq;
  }

  function announce() {
    if (listening === workers && api !== null && api.listening) {
      const pids = Object.values(cluster.workers).map((w) => w.process.pid);
      process.stdout.write(
        JSON.stringify({ port: boundPort, api_port: api.address().port, workers: pids }) + "\n",
      );
    }
  }

  cluster.on("listening", (w, address) => {
    boundPort = address.port;
    listening += 1;
    announce();
  });
  cluster.on("message", (w, m) => publish(m.c, m.f, m.d));
  cluster.on("exit", (w, code, signal) => {
    if (!stopping) console.error(`node_ws: worker ${w.process.pid} exited (${code ?? signal})`);
  });

  api = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const answer = (status, body) => {
        res.writeHead(status, { "content-type": "application/json" });
        res.end(JSON.stringify(body));
      };
      if (req.method !== "POST" || req.url.split("?")[0] !== "/api/publish") {
        return answer(404, { error: "not_found" });
      }
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks).toString());
      } catch (err) {
        return answer(400, { error: "bad_json", reason: String(err) });
      }
      if (body === null || typeof body !== "object" || !("data" in body)) {
        return answer(400, { error: "bad_field" });
      }
      let channel;
      if (typeof body.channel === "string") channel = body.channel;
      else if (body.broadcast === true) channel = null;
      else return answer(400, { error: "bad_target", reason: "channel or broadcast" });
      const seq = publish(channel, body.from ?? null, body.data);
      answer(202, { accepted: true, seq, workers });
    });
  });
  api.listen(apiPort, host, announce);

  const stop = () => {
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.process.kill("SIGTERM");
    api.close();
    setTimeout(() => process.exit(0), 5000).unref();
    cluster.on("exit", () => {
      if (Object.keys(cluster.workers).length === 0) process.exit(0);
    });
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);

  // Workers listen on the port the first one was given: listen(0) in a cluster
  // shares one port (the primary binds it once).
  for (let i = 0; i < workers; i++) cluster.fork();
}

function worker() {
  const { WebSocketServer, WebSocket } = require("ws");
  const channels = new Map(); // channel -> Set of sockets
  const ok = (id) => JSON.stringify({ ev: "ok", id });

  const wss = new WebSocketServer({ host, port, backlog, perMessageDeflate: false });

  wss.on("connection", (ws) => {
    ws.user = null;
    ws.subs = new Set();
    ws.on("message", (data, isBinary) => {
      if (isBinary) return;
      let op;
      try {
        op = JSON.parse(data.toString());
      } catch (err) {
        ws.send(JSON.stringify({ ev: "error", code: "bad_json", reason: String(err) }));
        return;
      }
      if (op === null || typeof op !== "object") {
        ws.send(JSON.stringify({ ev: "error", code: "not_object", reason: "a JSON object" }));
        return;
      }
      const id = op.id ?? null;
      const need = { hello: "user", sub: "channel", unsub: "channel", pub: "channel" };
      if (!(op.op in need) && op.op !== "ping") {
        ws.send(JSON.stringify({ ev: "error", code: "unknown_op", reason: "unknown op", id }));
        return;
      }
      if (op.op in need && typeof op[need[op.op]] !== "string") {
        ws.send(JSON.stringify({ ev: "error", code: "bad_field", reason: need[op.op], id }));
        return;
      }
      switch (op.op) {
        case "hello":
          ws.user = op.user;
          break;
        case "sub": {
          let subs = channels.get(op.channel);
          if (!subs) channels.set(op.channel, (subs = new Set()));
          subs.add(ws);
          ws.subs.add(op.channel);
          break;
        }
        case "unsub":
          channels.get(op.channel)?.delete(ws);
          ws.subs.delete(op.channel);
          break;
        case "pub":
          process.send({ c: op.channel, f: ws.user, d: op.data });
          break;
        case "ping":
          ws.send(JSON.stringify(id === null ? { ev: "pong" } : { ev: "pong", id }));
          return;
      }
      if (id !== null) ws.send(ok(id));
    });
    ws.on("close", () => {
      for (const name of ws.subs) {
        const subs = channels.get(name);
        if (subs) {
          subs.delete(ws);
          if (subs.size === 0) channels.delete(name);
        }
      }
    });
    ws.on("error", () => {});
  });

  // A publish relayed by the primary: the same bytes, as a text frame, to each subscriber.
  process.on("message", (m) => {
    const subs = m.c === null ? wss.clients : channels.get(m.c);
    if (!subs) return;
    const data = Buffer.from(m.l);
    for (const client of subs) {
      if (client.readyState === WebSocket.OPEN) client.send(data, { binary: false });
    }
  });
  process.on("SIGTERM", () => process.exit(0));
}
