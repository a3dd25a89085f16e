/* The floor's client: one load process, in C.
 *
 *     floor_client --index I --target 127.0.0.1:PORT --lane SRC:COUNT [--lane ...]
 *                  --rate R [--connect-timeout 10] [--max-in-flight 512]
 *                  [--report PATH] [--greet CHANNEL] [--reconnect BASE,CAP]
 *
 * Opens its lanes' connections (each bound to its lane's source IP with
 * IP_BIND_ADDRESS_NO_PORT, so the kernel picks the port per 4-tuple) at R per second,
 * with at most --max-in-flight connects and welcomes outstanding (as `manydoors load`),
 * and counts a connection ready when its welcome line arrived. Broadcast lines carry
 * their send time (CLOCK_REALTIME ns, "t"): each arrival goes into a 1 ms histogram per
 * message. Commands on stdin, one a line: "go" starts the ramp, "end" ends it where it
 * is, "stop" (or the end of stdin) writes the report and exits. Progress goes to stdout
 * as one JSON line (one write) every 250 ms.
 *
 * --greet CHANNEL drives a manydoors TCP service instead of the floor's server: each
 * connection says hello (as user c<index>-<n>) and subscribes to CHANNEL in its first
 * write, as `manydoors load --subscribe` does, and is ready at the sub's ok (id 2). An
 * error event before that counts as "refused". So the same client, at the same cost,
 * can ramp the floor's server and manydoors: the ratio of the two ramps is the servers'.
 *
 * --reconnect BASE,CAP (seconds): a connection that ends while not stopping (closed,
 * reset, refused, no answer) dials again on the same lane after a jittered exponential
 * backoff, min(CAP, BASE * 2^attempt) * [0.5, 1), as `manydoors load --reconnect`: the
 * floor's side of a reconnect storm (bench/storm.py). "ready_now" counts the
 * connections ready at this moment, "drops" the ready ones lost, "returns" the
 * redialed ones ready again.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_LANES 4096
#define MAX_SEQ 32         /* messages tracked (a bit each per connection) */
#define LAT_BUCKETS 120001 /* 1 ms buckets; the last holds everything slower */
#define CONN_BUCKETS 100001 /* 0.1 ms buckets */
#define EVENTS 512
#define MAX_ERRNO 256
#define PART_MAX 256 /* a partial line kept between reads */

enum { FREE, CONNECTING, WAITING, READY };

struct lane {
    struct sockaddr_in src;
    long count;
};

static struct lane lanes[MAX_LANES];
static int nlanes;
static struct sockaddr_in target;
static int ep, nofile, index_, max_in_flight = 512;
static double rate = 1000, connect_timeout = 10;
static const char *report_path, *greet_channel;
static long refused;

static uint8_t *state;
static int64_t *started; /* ns: the connect, then (once connected) the welcome */
static uint32_t *got;
static char **part; /* a line cut by a read: allocated only when that happens */

static long attempted, open_, peak, ready, in_flight, duplicates, closed_by_server;
static long no_answer, errs[MAX_ERRNO];
static long received[MAX_SEQ + 1];
static uint32_t *latency[MAX_SEQ + 1];
static uint32_t *connect_hist;
static int64_t t_go, first_attempt, last_connect, last_ready;
/* The window of connects and answers outstanding adapts as `manydoors load`'s does
 * (loadgen/window.py): an answer slower than a quarter of the connect timeout halves it
 * (once per such interval), one faster than an eighth widens it by one, 16 to
 * --max-in-flight. The floor's server answers at once: it stays at the maximum. */
static long window_size;
/* --reconnect: dials waiting for their time, a min-heap by due time. */
struct redial {
    int64_t due;
    int lane, attempt;
};
static struct redial *heap;
static long nheap, ready_now, drops, redials, returns;
static double backoff_base, backoff_cap; /* seconds; base 0: no reconnect */
static uint16_t *lane_of;
static uint8_t *attempt_of, *again;
static int64_t window_cut_at = INT64_MIN;
static int going, ramp_ended, ramp_done, stopping;
static int lane_at;
static long lane_left;

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t real_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static long rss_bytes(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &resident) != 2)
            resident = 0;
        fclose(f);
    }
    return resident * sysconf(_SC_PAGESIZE);
}

/* The names `manydoors load` reports errors by. */
static const char *errname(int e) {
    switch (e) {
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ECONNRESET: return "ECONNRESET";
    case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
    case EADDRINUSE: return "EADDRINUSE";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case ENOBUFS: return "ENOBUFS";
    case ENOMEM: return "ENOMEM";
    case EAGAIN: return "EAGAIN";
    case EPIPE: return "EPIPE";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ENETUNREACH: return "ENETUNREACH";
    default: return NULL;
    }
}

static void count_error(int e) {
    errs[e > 0 && e < MAX_ERRNO ? e : 0]++;
}

static void schedule(int lane, int attempt) {
    double delay = backoff_base * (double)(1L << (attempt < 20 ? attempt : 20));
    delay = (delay < backoff_cap ? delay : backoff_cap) * (0.5 + 0.5 * drand48());
    struct redial r = {mono_ns() + (int64_t)(delay * 1e9), lane, attempt};
    long i = nheap++;
    while (i > 0 && heap[(i - 1) / 2].due > r.due) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = r;
}

static struct redial unschedule(void) {
    struct redial top = heap[0], last = heap[--nheap];
    long i = 0;
    for (;;) {
        long child = 2 * i + 1;
        if (child >= nheap)
            break;
        if (child + 1 < nheap && heap[child + 1].due < heap[child].due)
            child++;
        if (heap[child].due >= last.due)
            break;
        heap[i] = heap[child];
        i = child;
    }
    if (nheap)
        heap[i] = last;
    return top;
}

static void forget(int fd) {
    int was = state[fd];
    if (was == CONNECTING || was == WAITING)
        in_flight--;
    if (was != CONNECTING)
        open_--;
    if (was == READY) {
        ready_now--;
        drops++;
    }
    if (backoff_base > 0 && !stopping)
        schedule(lane_of[fd], was == READY ? 0 : attempt_of[fd] + 1);
    state[fd] = FREE;
    got[fd] = 0;
    free(part[fd]);
    part[fd] = NULL;
    close(fd);
}

static void fail(int fd, int e) {
    count_error(e);
    forget(fd);
}

static void connected(int fd, int64_t now) {
    int64_t bucket = (now - started[fd]) / 100000;
    connect_hist[bucket < CONN_BUCKETS ? bucket : CONN_BUCKETS - 1]++;
    state[fd] = WAITING;
    started[fd] = now;
    last_connect = now;
    if (++open_ > peak)
        peak = open_;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
    if (greet_channel) {
        char hello[512];
        int len = snprintf(hello, sizeof hello,
                           "{\"op\":\"hello\",\"user\":\"c%d-%ld\",\"id\":1}\n"
                           "{\"op\":\"sub\",\"channel\":\"%s\",\"id\":2}\n",
                           index_, attempted, greet_channel);
        if (write(fd, hello, (size_t)len) != len) /* a few dozen bytes into an empty buffer */
            fail(fd, errno ? errno : EIO);
    }
}

static void dial(int lane, int attempt) {
    struct lane *l = &lanes[lane];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        count_error(errno);
        return;
    }
    if (fd >= nofile) {
        close(fd);
        count_error(EMFILE);
        return;
    }
    lane_of[fd] = (uint16_t)lane;
    attempt_of[fd] = (uint8_t)(attempt < 255 ? attempt : 255);
    again[fd] = attempt > 0;
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&l->src, sizeof l->src) != 0) {
        count_error(errno);
        close(fd);
        return;
    }
    int64_t now = mono_ns();
    started[fd] = now;
    state[fd] = CONNECTING;
    in_flight++;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) == 0)
        connected(fd, now);
    else if (errno != EINPROGRESS)
        fail(fd, errno);
}

static void open_one(void) {
    attempted++;
    if (first_attempt == 0)
        first_attempt = mono_ns();
    dial(lane_at, 0);
}

static void redial_step(void) {
    int64_t now = mono_ns();
    while (nheap && heap[0].due <= now && in_flight < window_size) {
        struct redial r = unschedule();
        redials++;
        dial(r.lane, r.attempt > 0 ? r.attempt : 1);
    }
}

static void answered(int fd) {
    int64_t now = mono_ns(), latency = now - started[fd];
    int64_t slow = (int64_t)(connect_timeout * 1e9 / 4), fast = slow / 2;
    if (latency > slow) {
        if (now - window_cut_at > slow) {
            window_size = window_size / 2 > 16 ? window_size / 2 : 16;
            window_cut_at = now;
        }
    } else if (latency < fast && window_size < max_in_flight) {
        window_size++;
    }
}

static void became_ready(int fd) {
    answered(fd);
    state[fd] = READY;
    in_flight--;
    ready++;
    ready_now++;
    if (again[fd])
        returns++;
    last_ready = mono_ns();
}

static void ramp_step(void) {
    if (!going || ramp_ended)
        return;
    int64_t now = mono_ns();
    long due = (long)((double)(now - t_go) / 1e9 * rate) + 1 - attempted;
    long room = window_size - in_flight;
    while (due > 0 && room > 0 && lane_at < nlanes) {
        if (lane_left == 0) {
            if (++lane_at >= nlanes)
                break;
            lane_left = lanes[lane_at].count;
            continue;
        }
        open_one();
        lane_left--;
        due--;
        room = window_size - in_flight;
    }
    if (lane_at >= nlanes || (lane_at == nlanes - 1 && lane_left == 0))
        ramp_ended = 1;
}

static long field(const char *line, const char *name) {
    const char *p = strstr(line, name);
    return p ? strtoll(p + strlen(name), NULL, 10) : -1;
}

static void on_line(int fd, char *line) {
    if (state[fd] == WAITING && greet_channel) {
        if (strncmp(line, "{\"ev\":\"error\"", 13) == 0) {
            refused++;
            forget(fd);
            return;
        }
        if (strncmp(line, "{\"ev\":\"ok\"", 10) != 0 || field(line, "\"id\":") != 2)
            return;
        became_ready(fd);
        return;
    }
    if (state[fd] == WAITING) {
        if (strncmp(line, "{\"ev\":\"welcome\"", 15) != 0)
            return;
        became_ready(fd);
        return;
    }
    if (strncmp(line, "{\"ev\":\"broadcast\"", 17) != 0)
        return;
    long seq = field(line, "\"seq\":");
    long long t = field(line, "\"t\":");
    if (seq < 1 || seq > MAX_SEQ || t < 0)
        return;
    uint32_t bit = 1u << (seq - 1);
    if (got[fd] & bit) {
        duplicates++;
        return;
    }
    got[fd] |= bit;
    received[seq]++;
    if (!latency[seq] && !(latency[seq] = calloc(LAT_BUCKETS, sizeof(uint32_t))))
        die("calloc");
    long long ms = (real_ns() - t) / 1000000;
    latency[seq][ms < 0 ? 0 : ms < LAT_BUCKETS ? ms : LAT_BUCKETS - 1]++;
}

static void on_readable(int fd) {
    char buf[4096 + PART_MAX + 1];
    for (;;) {
        size_t have = 0;
        if (part[fd]) {
            have = strlen(part[fd]);
            memcpy(buf, part[fd], have);
            free(part[fd]);
            part[fd] = NULL;
        }
        ssize_t n = read(fd, buf + have, 4096);
        if (n <= 0) {
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
            if (n == 0) {
                if (!stopping) {
                    if (state[fd] == WAITING)
                        no_answer++;
                    else
                        closed_by_server++;
                }
                forget(fd);
            } else {
                fail(fd, errno);
            }
            return;
        }
        have += (size_t)n;
        buf[have] = 0;
        char *line = buf, *nl;
        while ((nl = memchr(line, '\n', have - (size_t)(line - buf))) != NULL) {
            *nl = 0;
            on_line(fd, line);
            if (state[fd] == FREE)
                return; /* refused and closed */
            line = nl + 1;
        }
        size_t rest = have - (size_t)(line - buf);
        if (rest) {
            if (rest > PART_MAX) {
                fail(fd, 0); /* a line longer than any the floor sends */
                return;
            }
            part[fd] = strndup(line, rest);
        }
        if ((size_t)n < 4096)
            return;
    }
}

static void sweep(void) {
    int64_t limit = mono_ns() - (int64_t)(connect_timeout * 1e9);
    for (int fd = 0; fd < nofile; fd++) {
        if (state[fd] == CONNECTING && started[fd] < limit) {
            fail(fd, ETIMEDOUT);
        } else if (state[fd] == WAITING && started[fd] < limit) {
            no_answer++;
            forget(fd);
        }
    }
}

static int errors_json(char *out, size_t size) {
    int off = snprintf(out, size, "{");
    const char *sep = "";
    for (int e = 0; e < MAX_ERRNO && off < (int)size - 64; e++) {
        if (!errs[e])
            continue;
        const char *name = errname(e);
        if (name)
            off += snprintf(out + off, size - (size_t)off, "%s\"%s\":%ld", sep, name, errs[e]);
        else
            off += snprintf(out + off, size - (size_t)off, "%s\"errno %d\":%ld", sep, e, errs[e]);
        sep = ",";
    }
    if (no_answer)
        off += snprintf(out + off, size - (size_t)off, "%s\"no_answer\":%ld", sep, no_answer),
            sep = ",";
    if (closed_by_server)
        off += snprintf(out + off, size - (size_t)off, "%s\"closed_by_server\":%ld", sep,
                        closed_by_server), sep = ",";
    if (refused)
        off += snprintf(out + off, size - (size_t)off, "%s\"refused\":%ld", sep, refused);
    off += snprintf(out + off, size - (size_t)off, "}");
    return off;
}

static void progress(int final) {
    char line[4000], errors[1024];
    errors_json(errors, sizeof errors);
    double ramp_s = last_connect > first_attempt ? (double)(last_connect - first_attempt) / 1e9 : 0;
    double ready_s = last_ready > first_attempt ? (double)(last_ready - first_attempt) / 1e9 : 0;
    int off = snprintf(line, sizeof line,
                       "{\"client\":%d,\"pid\":%d,\"attempted\":%ld,\"open\":%ld,\"peak\":%ld,"
                       "\"ready\":%ld,\"in_flight\":%ld,\"ramp_done\":%s,\"ramp_s\":%.6f,"
                       "\"ready_s\":%.6f,\"duplicates\":%ld,\"rss_bytes\":%ld,\"final\":%s,"
                       "\"ready_now\":%ld,\"drops\":%ld,\"redials\":%ld,\"returns\":%ld,"
                       "\"errors\":%s,\"received\":[",
                       index_, (int)getpid(), attempted, open_, peak, ready, in_flight,
                       ramp_done ? "true" : "false", ramp_s, ready_s, duplicates, rss_bytes(),
                       final ? "true" : "false", ready_now, drops, redials, returns, errors);
    for (int s = 1; s <= MAX_SEQ; s++)
        off += snprintf(line + off, sizeof line - (size_t)off, "%s%ld", s > 1 ? "," : "",
                        received[s]);
    off += snprintf(line + off, sizeof line - (size_t)off, "]}\n");
    ssize_t w = write(1, line, (size_t)off);
    (void)w;
}

static void hist_json(FILE *f, const uint32_t *hist, int buckets) {
    fputc('{', f);
    const char *sep = "";
    for (int b = 0; b < buckets; b++) {
        if (hist[b]) {
            fprintf(f, "%s\"%d\":%u", sep, b, hist[b]);
            sep = ",";
        }
    }
    fputc('}', f);
}

static void write_report(void) {
    if (!report_path)
        return;
    FILE *f = fopen(report_path, "w");
    if (!f) {
        perror(report_path);
        return;
    }
    fprintf(f, "{\"client\":%d,\"connect_hist\":", index_);
    hist_json(f, connect_hist, CONN_BUCKETS);
    fprintf(f, ",\"latency\":{");
    const char *sep = "";
    for (int s = 1; s <= MAX_SEQ; s++) {
        if (latency[s]) {
            fprintf(f, "%s\"%d\":", sep, s);
            hist_json(f, latency[s], LAT_BUCKETS);
            sep = ",";
        }
    }
    fprintf(f, "}}\n");
    fclose(f);
}

/* Commands on stdin. Returns 1 to stop. */
static int command(void) {
    static char buf[256];
    static size_t len;
    ssize_t n = read(0, buf + len, sizeof buf - 1 - len);
    if (n == 0)
        return 1;
    if (n < 0)
        return errno == EAGAIN || errno == EINTR ? 0 : 1;
    len += (size_t)n;
    buf[len] = 0;
    char *line = buf, *nl;
    while ((nl = strchr(line, '\n')) != NULL) {
        *nl = 0;
        if (!strcmp(line, "go") && !going) {
            going = 1;
            t_go = mono_ns();
            lane_at = 0;
            lane_left = nlanes ? lanes[0].count : 0;
        } else if (!strcmp(line, "end")) {
            ramp_ended = 1;
        } else if (!strcmp(line, "stop")) {
            return 1;
        }
        line = nl + 1;
    }
    len = strlen(line);
    memmove(buf, line, len);
    return 0;
}

static void parse_addr(const char *text, struct sockaddr_in *a, long *number) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host) {
        fprintf(stderr, "floor_client: want HOST:NUMBER, got %s\n", text);
        exit(2);
    }
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = 0;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
        fprintf(stderr, "floor_client: bad address %s\n", host);
        exit(2);
    }
    *number = atol(colon + 1);
}

int main(int argc, char **argv) {
    long port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *flag = argv[i], *value = argv[i + 1];
        if (!strcmp(flag, "--index"))
            index_ = atoi(value);
        else if (!strcmp(flag, "--target")) {
            parse_addr(value, &target, &port);
            target.sin_port = htons((uint16_t)port);
        } else if (!strcmp(flag, "--lane")) {
            if (nlanes == MAX_LANES) {
                fprintf(stderr, "floor_client: at most %d lanes\n", MAX_LANES);
                return 2;
            }
            parse_addr(value, &lanes[nlanes].src, &lanes[nlanes].count);
            nlanes++;
        } else if (!strcmp(flag, "--rate"))
            rate = atof(value);
        else if (!strcmp(flag, "--connect-timeout"))
            connect_timeout = atof(value);
        else if (!strcmp(flag, "--max-in-flight"))
            max_in_flight = atoi(value);
        else if (!strcmp(flag, "--report"))
            report_path = value;
        else if (!strcmp(flag, "--greet"))
            greet_channel = value;
        else if (!strcmp(flag, "--reconnect")) {
            if (sscanf(value, "%lf,%lf", &backoff_base, &backoff_cap) != 2 || backoff_base <= 0 ||
                backoff_cap < backoff_base) {
                fprintf(stderr, "floor_client: --reconnect BASE,CAP (seconds, 0 < BASE <= CAP)\n");
                return 2;
            }
        }
        else {
            fprintf(stderr, "floor_client: unknown flag %s\n", flag);
            return 2;
        }
    }
    window_size = max_in_flight;
    if (!port || !nlanes || rate <= 0) {
        fprintf(stderr, "floor_client: --target, --lane and a positive --rate are needed\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    nofile = (int)rl.rlim_cur;
    state = calloc((size_t)nofile, 1);
    started = calloc((size_t)nofile, sizeof *started);
    got = calloc((size_t)nofile, sizeof *got);
    part = calloc((size_t)nofile, sizeof *part);
    connect_hist = calloc(CONN_BUCKETS, sizeof *connect_hist);
    heap = calloc((size_t)nofile, sizeof *heap);
    lane_of = calloc((size_t)nofile, sizeof *lane_of);
    attempt_of = calloc((size_t)nofile, 1);
    again = calloc((size_t)nofile, 1);
    srand48(getpid());
    if (!state || !started || !got || !part || !connect_hist || !heap || !lane_of ||
        !attempt_of || !again)
        die("calloc");
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1");
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = 0};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) != 0)
        die("epoll_ctl stdin");
    struct epoll_event evs[EVENTS];
    int64_t next_progress = 0, next_sweep = 0;
    progress(0);
    for (;;) {
        ramp_step();
        redial_step();
        int timeout = going && !ramp_ended ? 5 : 100;
        if (nheap) {
            int64_t wait_ms = (heap[0].due - mono_ns()) / 1000000 + 1;
            timeout = wait_ms < timeout ? (wait_ms > 0 ? (int)wait_ms : 0) : timeout;
        }
        int n = epoll_wait(ep, evs, EVENTS, timeout);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            uint32_t e = evs[i].events;
            if (fd == 0) {
                if (command())
                    stopping = 1;
                continue;
            }
            if (state[fd] == FREE)
                continue; /* closed earlier in this batch */
            if (state[fd] == CONNECTING) {
                if (!(e & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
                    continue;
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || ((e & EPOLLHUP) && !(e & EPOLLIN))) {
                    fail(fd, err ? err : ECONNRESET);
                    continue;
                }
                connected(fd, mono_ns());
            }
            if (e & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP))
                on_readable(fd);
        }
        int64_t now = mono_ns();
        if (now >= next_sweep) {
            sweep();
            next_sweep = now + 500000000;
        }
        if (going && ramp_ended && in_flight == 0)
            ramp_done = 1;
        if (stopping) {
            write_report();
            progress(1);
            return 0;
        }
        if (now >= next_progress) {
            progress(0);
            next_progress = now + 250000000;
        }
    }
}
