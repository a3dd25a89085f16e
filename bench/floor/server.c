/* The floor's server: the least a connection server can do, in C.
 *
 *     floor_server [--workers N] [--host 127.0.0.1] [--port 0] [--backlog 4096]
 *
 * The master binds one SO_REUSEPORT listening socket per worker (as manydoors'
 * supervisor does), forks the workers and prints one JSON line on stdout:
 * {"port": P, "workers": [pid, ...]}. Each worker is one epoll loop that accepts
 * (accept4, non-blocking), writes a welcome line {"ev":"welcome","id":"..."}, and
 * reads only to notice a close. Commands come on the master's stdin, one a line, and
 * are relayed to every worker through a pipe each:
 *
 *     b SEQ T    write {"ev":"broadcast","seq":SEQ,"data":{"t":T,"n":SEQ}} to every
 *                connection (T: the sender's CLOCK_REALTIME in ns), then print the
 *                worker's counts as a JSON line on stdout
 *     s          print the worker's counts
 *     q          (or end of stdin) print the counts and exit
 *
 * A worker dies with its master (PR_SET_PDEATHSIG). Built by bench/floor/floor.py
 * with `cc -O2 -Wall -Wextra`; no dependency beyond libc.
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
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 1024
#define EVENTS 512

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One write(2) of a whole line: lines from several processes on one pipe stay whole. */
static void say(const char *line, size_t len) {
    ssize_t n = write(1, line, len);
    (void)n;
}

static int raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        die("getrlimit");
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        die("setrlimit");
    return (int)rl.rlim_cur;
}

/* --- a worker ------------------------------------------------------------------ */

struct worker {
    int index, lfd, ctl, ep, reserve, nofile;
    int *conns; /* the open connections, densely */
    int *pos;   /* fd -> index in conns, -1 */
    int open;
    unsigned long long accepted, refused, closed, welcome_failed;
    unsigned long long sent, failed; /* broadcast writes: whole, not whole */
    char ctlbuf[4096];
    size_t ctllen;
};

static void report(struct worker *w, const char *event, long seq, double write_s) {
    char line[512];
    int n = snprintf(line, sizeof line,
                     "{\"worker\":%d,\"pid\":%d,\"event\":\"%s\",\"seq\":%ld,\"open\":%d,"
                     "\"accepted\":%llu,\"refused\":%llu,\"closed\":%llu,"
                     "\"welcome_failed\":%llu,\"sent\":%llu,\"failed\":%llu,\"write_s\":%.6f}\n",
                     w->index, (int)getpid(), event, seq, w->open, w->accepted, w->refused,
                     w->closed, w->welcome_failed, w->sent, w->failed, write_s);
    say(line, (size_t)n);
}

static void drop(struct worker *w, int fd) {
    int i = w->pos[fd];
    if (i >= 0) {
        int last = w->conns[--w->open];
        w->conns[i] = last;
        w->pos[last] = i;
        w->pos[fd] = -1;
    }
    close(fd); /* also leaves the epoll set */
    w->closed++;
}

static void accept_all(struct worker *w) {
    char hello[96];
    for (;;) {
        int fd = accept4(w->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && w->reserve >= 0) {
                /* Full: take the connection with the reserve fd and close it at once. */
                close(w->reserve);
                fd = accept4(w->lfd, NULL, NULL, SOCK_CLOEXEC);
                if (fd >= 0)
                    close(fd);
                w->reserve = open("/dev/null", O_RDONLY | O_CLOEXEC);
                w->refused++;
                if (fd >= 0)
                    continue;
            }
            return; /* EAGAIN, or nothing more to do now */
        }
        int n = snprintf(hello, sizeof hello, "{\"ev\":\"welcome\",\"id\":\"f%d.%llu\"}\n",
                         w->index, w->accepted);
        if (write(fd, hello, (size_t)n) != n) {
            close(fd);
            w->welcome_failed++;
            continue;
        }
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = fd};
        if (fd >= w->nofile || epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            close(fd);
            w->refused++;
            continue;
        }
        w->pos[fd] = w->open;
        w->conns[w->open++] = fd;
        w->accepted++;
    }
}

static void broadcast(struct worker *w, long seq, long long t) {
    char line[160];
    int n = snprintf(line, sizeof line,
                     "{\"ev\":\"broadcast\",\"seq\":%ld,\"data\":{\"t\":%lld,\"n\":%ld}}\n", seq,
                     t, seq);
    double start = now_s();
    for (int i = 0; i < w->open; i++) {
        if (write(w->conns[i], line, (size_t)n) == n)
            w->sent++;
        else
            w->failed++; /* a full socket buffer: the floor keeps no queue */
    }
    report(w, "broadcast", seq, now_s() - start);
}

/* Returns 0 to go on, 1 to exit. */
static int command(struct worker *w) {
    ssize_t got = read(w->ctl, w->ctlbuf + w->ctllen, sizeof w->ctlbuf - 1 - w->ctllen);
    if (got == 0)
        return 1;
    if (got < 0)
        return errno == EINTR || errno == EAGAIN ? 0 : 1;
    w->ctllen += (size_t)got;
    w->ctlbuf[w->ctllen] = 0;
    char *line = w->ctlbuf, *nl;
    while ((nl = strchr(line, '\n')) != NULL) {
        *nl = 0;
        long seq = 0;
        long long t = 0;
        if (line[0] == 'b' && sscanf(line + 1, "%ld %lld", &seq, &t) == 2)
            broadcast(w, seq, t);
        else if (line[0] == 's')
            report(w, "stats", 0, 0);
        else if (line[0] == 'q')
            return 1;
        line = nl + 1;
    }
    w->ctllen = strlen(line);
    memmove(w->ctlbuf, line, w->ctllen);
    return 0;
}

static void worker_main(int index, int lfd, int ctl, int nofile) {
    struct worker w = {.index = index, .lfd = lfd, .ctl = ctl, .nofile = nofile};
    w.conns = calloc((size_t)nofile, sizeof(int));
    w.pos = malloc((size_t)nofile * sizeof(int));
    if (!w.conns || !w.pos)
        die("malloc");
    memset(w.pos, 0xff, (size_t)nofile * sizeof(int));
    w.reserve = open("/dev/null", O_RDONLY | O_CLOEXEC);
    w.ep = epoll_create1(EPOLL_CLOEXEC);
    if (w.ep < 0)
        die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    if (epoll_ctl(w.ep, EPOLL_CTL_ADD, lfd, &ev) != 0)
        die("epoll_ctl listener");
    ev.data.fd = ctl;
    if (epoll_ctl(w.ep, EPOLL_CTL_ADD, ctl, &ev) != 0)
        die("epoll_ctl control");
    struct epoll_event evs[EVENTS];
    char scratch[4096];
    for (;;) {
        int n = epoll_wait(w.ep, evs, EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                accept_all(&w);
            } else if (fd == ctl) {
                if (command(&w)) {
                    report(&w, "exit", 0, 0);
                    exit(0);
                }
            } else {
                /* Clients send nothing the floor needs: read only to see the close. */
                ssize_t r;
                while ((r = read(fd, scratch, sizeof scratch)) > 0)
                    ;
                if (r == 0 || (errno != EAGAIN && errno != EINTR))
                    drop(&w, fd);
            }
        }
    }
}

/* --- the master ------------------------------------------------------------------ */

static int listener(const char *host, int port, int backlog) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)
        die("SO_REUSEPORT");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "floor_server: bad host %s\n", host);
        exit(2);
    }
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0)
        die("bind");
    if (listen(fd, backlog) != 0)
        die("listen");
    return fd;
}

int main(int argc, char **argv) {
    int workers = 2, port = 0, backlog = 4096;
    const char *host = "127.0.0.1";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--workers"))
            workers = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--port"))
            port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--backlog"))
            backlog = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--host"))
            host = argv[i + 1];
        else {
            fprintf(stderr, "floor_server: unknown flag %s\n", argv[i]);
            return 2;
        }
    }
    if (workers < 1 || workers > MAX_WORKERS) {
        fprintf(stderr, "floor_server: --workers 1..%d\n", MAX_WORKERS);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int nofile = raise_nofile();
    static int lfds[MAX_WORKERS], ctl[MAX_WORKERS];
    static pid_t pids[MAX_WORKERS];
    for (int i = 0; i < workers; i++) {
        lfds[i] = listener(host, port, backlog);
        if (port == 0) {
            struct sockaddr_in a;
            socklen_t len = sizeof a;
            getsockname(lfds[i], (struct sockaddr *)&a, &len);
            port = ntohs(a.sin_port);
        }
    }
    pid_t master = getpid();
    for (int i = 0; i < workers; i++) {
        int p[2];
        if (pipe2(p, O_CLOEXEC) != 0)
            die("pipe2");
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != master)
                _exit(1);
            close(p[1]);
            for (int j = 0; j < i; j++)
                close(ctl[j]);
            for (int j = 0; j < workers; j++)
                if (j != i)
                    close(lfds[j]);
            worker_main(i, lfds[i], p[0], nofile);
        }
        close(p[0]);
        ctl[i] = p[1];
        pids[i] = pid;
    }
    for (int i = 0; i < workers; i++)
        close(lfds[i]);
    char line[65536];
    int off = snprintf(line, sizeof line, "{\"port\":%d,\"workers\":[", port);
    for (int i = 0; i < workers && off < (int)sizeof line - 32; i++)
        off += snprintf(line + off, sizeof line - (size_t)off, "%s%d", i ? "," : "", (int)pids[i]);
    off += snprintf(line + off, sizeof line - (size_t)off, "]}\n");
    say(line, (size_t)off);
    /* Relay stdin's commands to every worker, until "q" or the end of stdin. */
    char cmd[256];
    while (fgets(cmd, sizeof cmd, stdin) != NULL) {
        if (cmd[0] == 'q')
            break;
        size_t len = strlen(cmd);
        for (int i = 0; i < workers; i++)
            if (write(ctl[i], cmd, len) != (ssize_t)len)
                fprintf(stderr, "floor_server: worker %d took no command\n", i);
    }
    for (int i = 0; i < workers; i++) {
        if (write(ctl[i], "q\n", 2) != 2)
            fprintf(stderr, "floor_server: worker %d took no q\n", i);
        close(ctl[i]);
    }
    for (int i = 0; i < workers; i++)
        waitpid(pids[i], NULL, 0);
    return 0;
}
