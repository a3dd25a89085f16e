// An independent WebSocket peer: Node's `ws` client. Says hello, subscribes, prints
// every event it receives as one JSON line, and exits after `want` msg events.
const WebSocket = require("ws");
const [url, user, channel, want] = process.argv.slice(2);
const ws = new WebSocket(url);
let got = 0;
const timer = setTimeout(() => { console.error("timeout"); process.exit(2); }, 15000);
ws.on("message", (data, isBinary) => {
  const event = JSON.parse(data.toString());
  console.log(JSON.stringify({ binary: isBinary, event }));
  if (event.ev === "welcome") {
    ws.send(JSON.stringify({ op: "hello", user, id: 1 }));
    ws.send(JSON.stringify({ op: "sub", channel, id: 2 }));
  }
  if (event.ev === "msg" && ++got >= Number(want)) {
    clearTimeout(timer);
    ws.close(1000, "done");
  }
});
ws.on("close", (code) => { console.log(JSON.stringify({ closed: code })); process.exit(0); });
ws.on("error", (err) => { console.error(String(err)); process.exit(1); });
