// What the Pusher peers share: one JSON line out per thing seen (stdout), one JSON
// command a line in (stdin), and an exit when the test goes away or overstays.
const readline = require("readline");

// Errors (an HTTPAuthError, a WebSocket error event) as plain JSON.
function plain(value) {
  return JSON.parse(
    JSON.stringify(value === undefined ? null : value, (key, v) => {
      if (v instanceof Error) return { name: v.name, message: v.message, status: v.status };
      if (typeof v === "function") return undefined;
      if (v && typeof v === "object" && v.target && v.type) return { type: v.type, message: v.message };
      return v;
    }),
  );
}

function out(record) {
  process.stdout.write(JSON.stringify(plain(record)) + "\n");
}

// Calls handle(command) for each JSON line on stdin; exits when stdin ends (the test
// closed it or died) or after `lifetime` ms, so no peer outlives its test.
function commands(handle, lifetime = 60000) {
  const timer = setTimeout(() => {
    out({ type: "fatal", error: "lifetime over" });
    process.exit(3);
  }, lifetime);
  timer.unref();
  const rl = readline.createInterface({ input: process.stdin });
  rl.on("line", (line) => {
    if (!line.trim()) return;
    try {
      handle(JSON.parse(line));
    } catch (err) {
      out({ type: "fatal", error: String(err && err.stack ? err.stack : err) });
    }
  });
  rl.on("close", () => process.exit(0));
}

function config() {
  return JSON.parse(process.argv[2]);
}

module.exports = { out, commands, config, plain };
