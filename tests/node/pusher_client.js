// An independent Pusher client: npm pusher-js (its Node build) against a manydoors
// "pusher" service. Config (argv[2], JSON): key, host, port, authEndpoint,
// userAuthEndpoint, headers. Commands (stdin, JSON lines): subscribe, unsubscribe,
// trigger, signin, disconnect. Prints what pusher-js reports, one JSON line each:
// state changes, errors, every message it decodes, and each channel's events.
const Pusher = require("pusher-js");
const { out, commands, config } = require("./peer");

const cfg = config();
Pusher.log = (message) => process.stderr.write(String(message) + "\n");
const pusher = new Pusher(cfg.key, {
  wsHost: cfg.host,
  wsPort: cfg.port,
  forceTLS: false,
  enabledTransports: ["ws"],
  cluster: "mt1",
  channelAuthorization: { endpoint: cfg.authEndpoint || "", transport: "ajax", headers: cfg.headers || {} },
  userAuthentication: { endpoint: cfg.userAuthEndpoint || "", transport: "ajax", headers: cfg.headers || {} },
});

pusher.connection.bind("state_change", ({ previous, current }) =>
  out({
    type: "state",
    previous,
    current,
    socket_id: pusher.connection.socket_id || null,
    activity_timeout: pusher.connection.activityTimeout || null, // ms: min(server's, 120 s)
  }),
);
pusher.connection.bind("error", (error) => out({ type: "error", error }));
pusher.connection.bind("message", (m) =>
  out({ type: "message", event: m.event, channel: m.channel, data: m.data, user_id: m.user_id }),
);
pusher.user.bind_global((event, data) => out({ type: "user_event", event, data }));

// Channel events printed on their own line above (the rest, pusher:cache_miss too, as "event").
const REPORTED = new Set([
  "pusher:subscription_succeeded",
  "pusher:subscription_error",
  "pusher:member_added",
  "pusher:member_removed",
]);

function members(ch) {
  return { count: ch.members.count, me: ch.members.me, hash: ch.members.members };
}

function subscribe(name) {
  const ch = pusher.subscribe(name);
  ch.bind("pusher:subscription_succeeded", () =>
    out({ type: "subscribed", channel: name, members: ch.members ? members(ch) : undefined }),
  );
  ch.bind("pusher:subscription_error", (data) => out({ type: "subscription_error", channel: name, data }));
  ch.bind("pusher:member_added", (member) => out({ type: "member_added", channel: name, member }));
  ch.bind("pusher:member_removed", (member) => out({ type: "member_removed", channel: name, member }));
  ch.bind_global((event, data) => {
    if (!REPORTED.has(event)) out({ type: "event", channel: name, event, data });
  });
}

commands((cmd) => {
  switch (cmd.op) {
    case "subscribe":
      subscribe(cmd.channel);
      break;
    case "unsubscribe":
      pusher.unsubscribe(cmd.channel);
      break;
    case "trigger": {
      const ok = pusher.channel(cmd.channel).trigger(cmd.event, cmd.data);
      out({ type: "triggered", channel: cmd.channel, event: cmd.event, ok });
      break;
    }
    case "signin":
      pusher.signin();
      break;
    case "disconnect":
      pusher.disconnect();
      break;
    default:
      out({ type: "fatal", error: `unknown op ${cmd.op}` });
  }
});
