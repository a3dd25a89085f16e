// An independent Laravel Echo app: npm laravel-echo on npm pusher-js (Node build),
// authorizing private and presence channels at the test backend's /broadcasting/auth.
// An ES module: laravel-echo 2.x is one ("type": "module"), and its CommonJS build
// cannot be require()d in Node 20.
// Config (argv[2], JSON): key, host, port, authEndpoint, headers. Commands (stdin, JSON
// lines): private {channel, listen: [names]}, join {channel}, whisper {channel, event,
// data}, leave {channel}, disconnect. Prints what Echo hands the app: listen, here,
// joining, leaving, whisper, subscribed, error; and the connection's states.
import Pusher from "pusher-js";
import Echo from "laravel-echo";
import { out, commands, config } from "./peer.js";

const cfg = config();
Pusher.log = (message) => process.stderr.write(String(message) + "\n");
const echo = new Echo({
  broadcaster: "pusher",
  Pusher,
  key: cfg.key,
  wsHost: cfg.host,
  wsPort: cfg.port,
  forceTLS: false,
  enabledTransports: ["ws"],
  cluster: "mt1",
  authEndpoint: cfg.authEndpoint,
  auth: { headers: cfg.headers || {} },
});
const connection = echo.connector.pusher.connection;
connection.bind("state_change", ({ previous, current }) =>
  out({ type: "state", previous, current, socket_id: echo.socketId() || null }),
);
connection.bind("error", (error) => out({ type: "error", error }));

function common(channel, name) {
  return channel
    .subscribed(() => out({ type: "subscribed", channel: name }))
    .error((data) => out({ type: "error", channel: name, data }));
}

function listen(channel, name, events) {
  for (const event of events || []) {
    channel.listen(event, (data) => out({ type: "listen", channel: name, event, data }));
  }
  channel.listenForWhisper("typing", (data) => out({ type: "whisper", channel: name, event: "typing", data }));
}

commands((cmd) => {
  switch (cmd.op) {
    case "private":
      listen(common(echo.private(cmd.channel), cmd.channel), cmd.channel, cmd.listen);
      break;
    case "join": {
      const channel = common(echo.join(cmd.channel), cmd.channel)
        .here((members) => out({ type: "here", channel: cmd.channel, members }))
        .joining((member) => out({ type: "joining", channel: cmd.channel, member }))
        .leaving((member) => out({ type: "leaving", channel: cmd.channel, member }));
      listen(channel, cmd.channel, cmd.listen);
      break;
    }
    case "whisper": {
      // Echo names its channels with their prefix: private-orders, presence-room.
      const name = Object.keys(echo.connector.channels).find((n) => n.endsWith("-" + cmd.channel));
      echo.connector.channels[name].whisper(cmd.event, cmd.data);
      out({ type: "whispered", channel: cmd.channel });
      break;
    }
    case "leave":
      echo.leave(cmd.channel);
      break;
    case "disconnect":
      echo.disconnect();
      break;
    default:
      out({ type: "fatal", error: `unknown op ${cmd.op}` });
  }
});
