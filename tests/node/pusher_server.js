// The npm Pusher server library (pusher-http-node), once: trigger one event through
// the REST API of a manydoors node, then ask for the channel's info. Config (argv[2],
// JSON): appId, key, secret, host, port, channel, event, data. Prints one JSON line:
// the trigger's status and body, the channel info's status and body (or the error).
const Pusher = require("pusher");
const { out, config } = require("./peer");

const cfg = config();
const pusher = new Pusher({
  appId: cfg.appId,
  key: cfg.key,
  secret: cfg.secret,
  host: cfg.host,
  port: String(cfg.port),
  useTLS: false,
});

async function main() {
  const triggered = await pusher.trigger(cfg.channel, cfg.event, cfg.data);
  const info = await pusher.get({ path: `/channels/${cfg.channel}`, params: { info: "subscription_count" } });
  out({
    trigger: { status: triggered.status, body: await triggered.json() },
    info: { status: info.status, body: await info.json() },
  });
}

main().then(
  () => process.exit(0),
  (err) => {
    out({ error: { name: err.name, message: err.message, status: err.status, body: err.body } });
    process.exit(1);
  },
);
