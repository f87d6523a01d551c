/* The SSE subscribers of bench_sse.py, in C.
 *
 * Why C: on a 2-core machine the subscribers share the cores with the gateway they measure.
 * The asyncio client costs about 10 us of CPU per event received, more than the gateway spends
 * sending it, so at 5,000 subscribers it takes a core the gateway then lacks. This one does the
 * same work (one TCP connection per subscriber, an HTTP/1.1 GET, a scan of the raw bytes for
 * "seq": and "sent_ns":) in a plain epoll loop, like wrk or h2load would.
 *
 * It speaks the Python client's protocol with bench_sse.py: the same flags; "READY {json}" on
 * stdout once every connection has its `retry:` line or failed; on each "MARK" line on stdin,
 * a snapshot of the counts and "MARK {"total": n}"; on "STOP" or EOF, it closes everything,
 * writes the latencies (int64 us, as many as at the last snapshot) to --out and prints
 * "RESULT {json}". Latency = CLOCK_REALTIME when read() returns the bytes - sent_ns.
 *
 * --poll-us P (0: off): once connected, it reads every stream that has data each P us (epoll_wait
 * with no timeout, then a sleep) instead of sleeping in epoll_wait. A subscriber that sleeps
 * there must be woken by the gateway's write (a cross-core wake-up inside the gateway's send,
 * about a tenth of its CPU at 5,000 streams), which subscribers on other hosts never cost the
 * gateway's host. The latency measured includes the wait: at most P us more, never less.
 *
 * Build: cc -O2 -o sse_client sse_client.c  (bench_sse.py does it in its temp dir).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_SIZE (256 * 1024)
#define MAX_CARRY (64 * 1024) /* an incomplete line longer than this is a parse error */
#define CONNECT_TIMEOUT_NS (30LL * 1000000000LL)
#define STDIN_TAG UINT64_MAX

enum state { CONNECTING, HEAD, LIVE, DONE };

typedef struct {
    int fd;
    enum state state;
    int record;          /* every stride-th subscriber's latencies are kept */
    int closed_by_server;
    const char *error;   /* why it failed before its `retry:` line */
    int64_t started_ns;
    char *carry;         /* the head until `retry:`, then an incomplete last line */
    size_t carry_len, carry_cap;
    int64_t last_seq;
    int64_t received;    /* measured events */
    int64_t others;      /* warm-up and profiling events */
    int64_t snap_received;
} conn_t;

static struct {
    const char *host, *key, *out;
    int port, count, index_offset, stride, connect_concurrency;
    long poll_us;
    int64_t first_seq, measured;
} opt = {.host = "127.0.0.1", .stride = 1, .connect_concurrency = 100};

static conn_t *conns;
static int epfd;
static char *request;
static size_t request_len;
static int stopping;
static int64_t total, duplicates, parse_errors;
static int64_t *latencies;
static size_t n_latencies, cap_latencies;
static int64_t *closed_at;
static size_t n_closed_at, cap_closed_at;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *grow(void *p, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return p;
    *cap = need > 2 * *cap ? need : 2 * *cap;
    p = realloc(p, *cap * item);
    if (!p) die("realloc");
    return p;
}

static void push_latency(int64_t us) {
    latencies = grow(latencies, &cap_latencies, n_latencies + 1, sizeof *latencies);
    latencies[n_latencies++] = us;
}

static void close_conn(conn_t *c) {
    if (c->fd >= 0) {
        close(c->fd); /* also leaves the epoll set */
        c->fd = -1;
    }
    free(c->carry);
    c->carry = NULL;
    c->carry_len = c->carry_cap = 0;
    c->state = DONE;
}

static void fail(conn_t *c, const char *reason) {
    if (!c->error) c->error = reason;
    close_conn(c);
}

static void ended_by_server(conn_t *c) {
    if (!stopping && !c->closed_by_server) {
        c->closed_by_server = 1;
        closed_at = grow(closed_at, &cap_closed_at, n_closed_at + 1, sizeof *closed_at);
        closed_at[n_closed_at++] = now_ns();
    }
    close_conn(c);
}

/* Parses an integer at p (up to end); returns the position after it, or NULL. */
static const char *parse_int(const char *p, const char *end, int64_t *value) {
    int64_t v = 0;
    int neg = 0, digits = 0;
    while (p < end && *p == ' ') p++;
    if (p < end && *p == '-') neg = 1, p++;
    while (p < end && *p >= '0' && *p <= '9') v = v * 10 + (*p++ - '0'), digits++;
    if (!digits) return NULL;
    *value = neg ? -v : v;
    return p;
}

/* The events in buf[0, len): whole lines only; what follows the last '\n' is carried over. */
static void scan_events(conn_t *c, const char *buf, size_t len, int64_t now) {
    const char *last_nl = memrchr(buf, '\n', len);
    size_t cut = last_nl ? (size_t)(last_nl - buf) + 1 : 0;
    const char *end = buf + cut;
    /* A last chunk (after a line end, or first) means the server ended the response. */
    int ended = (len >= 5 && memcmp(buf, "0\r\n\r\n", 5) == 0) ||
                memmem(buf, len, "\n0\r\n\r\n", 6) != NULL;
    const char *p = buf;
    while ((p = memmem(p, (size_t)(end - p), "\"seq\":", 6)) != NULL) {
        int64_t seq, sent_ns;
        const char *q = parse_int(p + 6, end, &seq);
        const char *k = q ? memmem(q, (size_t)(end - q), "\"sent_ns\":", 10) : NULL;
        const char *e = k ? parse_int(k + 10, end, &sent_ns) : NULL;
        if (!e || *e != '}') {
            parse_errors++;
            break;
        }
        total++;
        if (seq <= c->last_seq) {
            duplicates++;
        } else {
            c->last_seq = seq;
            if (opt.first_seq <= seq && seq < opt.first_seq + opt.measured) {
                c->received++;
                if (c->record) push_latency((now - sent_ns) / 1000);
            } else {
                c->others++;
            }
        }
        p = e;
    }
    size_t rest = len - cut;
    if (rest > MAX_CARRY) {
        parse_errors++;
        rest = 0;
    }
    c->carry = grow(c->carry, &c->carry_cap, rest + 1, 1);
    memmove(c->carry, end, rest);
    c->carry_len = rest;
    if (ended) ended_by_server(c);
}

/* Until the `retry:` line: a 200 response head, then the SSE preamble. */
static void on_head(conn_t *c, const char *data, size_t len, int64_t now) {
    if (c->carry_len + len > MAX_CARRY) {
        fail(c, "no retry: line in the first 64 KiB");
        return;
    }
    char *head = c->carry = grow(c->carry, &c->carry_cap, c->carry_len + len + 1, 1);
    memcpy(head + c->carry_len, data, len);
    c->carry_len += len;
    head[c->carry_len] = '\0';
    char *end = memmem(head, c->carry_len, "\r\n\r\n", 4);
    if (!end) return;
    if (strncmp(head, "HTTP/1.1 200", 12) != 0 && strncmp(head, "HTTP/1.0 200", 12) != 0) {
        fail(c, "HTTP status not 200");
        return;
    }
    char *at = memmem(end, c->carry_len - (size_t)(end - head), "retry:", 6);
    char *line_end = at ? memchr(at, '\n', c->carry_len - (size_t)(at - head)) : NULL;
    if (!line_end) return;
    c->state = LIVE;
    /* What follows the `retry:` line is events: scan it from the head's buffer, which the
     * stream then no longer owns (scan_events keeps the incomplete last line in a new one). */
    char *events = line_end + 1;
    size_t rest = c->carry_len - (size_t)(events - head);
    c->carry = NULL;
    c->carry_len = c->carry_cap = 0;
    if (rest) scan_events(c, events, rest, now);
    free(head);
}

static void on_readable(conn_t *c, char *buf) {
    size_t kept = c->state == LIVE ? c->carry_len : 0; /* an incomplete line goes first */
    if (kept) memcpy(buf, c->carry, kept);
    ssize_t n = read(c->fd, buf + kept, READ_SIZE);
    int64_t now = now_ns();
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) { /* EOF or reset */
        if (c->state == HEAD) fail(c, "closed before retry:");
        else ended_by_server(c);
        return;
    }
    if (c->state == HEAD) on_head(c, buf, (size_t)n, now);
    else scan_events(c, buf, kept + (size_t)n, now);
}

static void start_connect(conn_t *c) {
    c->started_ns = now_ns();
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        fail(c, "socket failed");
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
    if (inet_pton(AF_INET, opt.host, &addr.sin_addr) != 1) {
        fail(c, "--host is not an IPv4 address");
        return;
    }
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        fail(c, "connect failed");
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)(c - conns)};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
    c->state = CONNECTING;
}

static void on_connected(conn_t *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        fail(c, "connect refused or reset");
        return;
    }
    if (write(c->fd, request, request_len) != (ssize_t)request_len) {
        fail(c, "request write failed");
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)(c - conns)};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
    c->state = HEAD;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static struct {
    int64_t others, duplicates, parse_errors, closed_by_server;
    size_t samples, closed_at;
    int taken;
} snap;

static void snapshot(void) {
    snap.others = snap.closed_by_server = 0;
    for (int i = 0; i < opt.count; i++) {
        conn_t *c = &conns[i];
        if (c->error) continue;
        c->snap_received = c->received;
        snap.others += c->others;
        snap.closed_by_server += c->closed_by_server;
    }
    snap.duplicates = duplicates;
    snap.parse_errors = parse_errors;
    snap.samples = n_latencies;
    snap.closed_at = n_closed_at;
    snap.taken = 1;
}

static void print_result(void) {
    int64_t *got = malloc(sizeof *got * (size_t)(opt.count ? opt.count : 1));
    int n = 0;
    for (int i = 0; i < opt.count; i++)
        if (!conns[i].error) got[n++] = conns[i].snap_received;
    qsort(got, (size_t)n, sizeof *got, cmp_i64);
    printf("RESULT {\"received\": [");
    for (int i = 0; i < n;) {
        int j = i;
        while (j < n && got[j] == got[i]) j++;
        printf("%s[%lld, %d]", i ? ", " : "", (long long)got[i], j - i);
        i = j;
    }
    printf("], \"others\": %lld, \"duplicates\": %lld, \"parse_errors\": %lld, "
           "\"closed_by_server\": %lld, \"closed_at\": [",
           (long long)snap.others, (long long)snap.duplicates, (long long)snap.parse_errors,
           (long long)snap.closed_by_server);
    for (size_t i = 0; i < snap.closed_at; i++)
        printf("%s%lld", i ? ", " : "", (long long)closed_at[i]);
    printf("], \"samples\": %zu}\n", snap.samples);
    fflush(stdout);
    free(got);
}

static void print_ready(double seconds) {
    /* Failures grouped by reason, as the Python client's Counter(...).most_common(5). */
    const char *reasons[8];
    int counts[8], kinds = 0, failed = 0;
    for (int i = 0; i < opt.count; i++) {
        const char *e = conns[i].error;
        if (!e) continue;
        failed++;
        int k = 0;
        while (k < kinds && strcmp(reasons[k], e) != 0) k++;
        if (k == kinds && kinds < 8) reasons[kinds] = e, counts[kinds++] = 0;
        if (k < kinds) counts[k]++;
    }
    printf("READY {\"connected\": %d, \"failed\": %d, \"errors\": [", opt.count - failed, failed);
    for (int k = 0; k < kinds && k < 5; k++)
        printf("%s[\"%s\", %d]", k ? ", " : "", reasons[k], counts[k]);
    printf("], \"seconds\": %.2f}\n", seconds);
    fflush(stdout);
}

/* Reads what stdin has; returns 1 when the parent said STOP (or went away). */
static int on_stdin(void) {
    static char line[256];
    static size_t used;
    ssize_t n = read(0, line + used, sizeof line - 1 - used);
    if (n <= 0) return 1;
    used += (size_t)n;
    char *nl;
    while ((nl = memchr(line, '\n', used)) != NULL) {
        *nl = '\0';
        int is_mark = strcmp(line, "MARK") == 0;
        used -= (size_t)(nl + 1 - line);
        memmove(line, nl + 1, used);
        if (!is_mark) return 1;
        snapshot();
        printf("MARK {\"total\": %lld}\n", (long long)total);
        fflush(stdout);
    }
    if (used == sizeof line - 1) return 1; /* not a line we know */
    return 0;
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--host")) opt.host = v;
        else if (!strcmp(k, "--port")) opt.port = atoi(v);
        else if (!strcmp(k, "--key")) opt.key = v;
        else if (!strcmp(k, "--count")) opt.count = atoi(v);
        else if (!strcmp(k, "--index-offset")) opt.index_offset = atoi(v);
        else if (!strcmp(k, "--first-seq")) opt.first_seq = atoll(v);
        else if (!strcmp(k, "--measured")) opt.measured = atoll(v);
        else if (!strcmp(k, "--stride")) opt.stride = atoi(v);
        else if (!strcmp(k, "--connect-concurrency")) opt.connect_concurrency = atoi(v);
        else if (!strcmp(k, "--out")) opt.out = v;
        else if (!strcmp(k, "--poll-us")) opt.poll_us = atol(v);
        else {
            fprintf(stderr, "sse_client: unknown option %s\n", k);
            exit(2);
        }
    }
    if (!opt.port || !opt.key || !opt.out || opt.count <= 0 || opt.stride <= 0 ||
        opt.connect_concurrency <= 0 || opt.poll_us < 0) {
        fprintf(stderr, "sse_client: --port, --key, --count, --first-seq, --measured, --out\n");
        exit(2);
    }
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    struct rlimit lim;
    getrlimit(RLIMIT_NOFILE, &lim);
    rlim_t need = (rlim_t)opt.count + 256;
    if (lim.rlim_cur < need) {
        lim.rlim_cur = need < lim.rlim_max ? need : lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    if (asprintf(&request, "GET /intent/execute-wasm/events HTTP/1.1\r\nHost: %s:%d\r\n"
                 "X-API-Key: %s\r\nAccept: text/event-stream\r\n\r\n",
                 opt.host, opt.port, opt.key) < 0) die("asprintf");
    request_len = strlen(request);
    conns = calloc((size_t)opt.count, sizeof *conns);
    char *buf = malloc(MAX_CARRY + READ_SIZE);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (!conns || !buf || epfd < 0) die("setup");
    for (int i = 0; i < opt.count; i++) {
        conns[i].fd = -1;
        conns[i].state = DONE;
        conns[i].last_seq = -1;
        conns[i].record = (opt.index_offset + i) % opt.stride == 0;
    }

    /* Connect: at most connect_concurrency without their `retry:` line at once. */
    int64_t started = now_ns();
    int next = 0, pending = 0, settled = 0;
    struct epoll_event events[512];
    while (settled < opt.count) {
        while (next < opt.count && pending < opt.connect_concurrency) {
            start_connect(&conns[next++]);
            pending++;
        }
        int n = epoll_wait(epfd, events, 512, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            conn_t *c = &conns[events[i].data.u64];
            if (c->state == CONNECTING) on_connected(c);
            else if (c->state != DONE) on_readable(c, buf);
        }
        settled = 0;
        pending = 0;
        int64_t now = now_ns();
        for (int i = 0; i < next; i++) {
            conn_t *c = &conns[i];
            if ((c->state == CONNECTING || c->state == HEAD) &&
                now - c->started_ns > CONNECT_TIMEOUT_NS)
                fail(c, "TimeoutError");
            if (c->state == CONNECTING || c->state == HEAD) pending++;
            else settled++;
        }
    }
    print_ready((double)(now_ns() - started) / 1e9);

    /* Live: read every stream; the parent's lines come on stdin. */
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = STDIN_TAG};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) < 0) die("epoll_ctl stdin");
    struct timespec poll_period = {opt.poll_us / 1000000, (opt.poll_us % 1000000) * 1000};
    for (;;) {
        int n = epoll_wait(epfd, events, 512, opt.poll_us ? 0 : -1);
        if (n == 0 && opt.poll_us) {
            nanosleep(&poll_period, NULL);
            continue;
        }
        if (n < 0 && errno != EINTR) die("epoll_wait");
        int stop = 0;
        for (int i = 0; i < n; i++) {
            if (events[i].data.u64 == STDIN_TAG) {
                stop |= on_stdin();
                continue;
            }
            conn_t *c = &conns[events[i].data.u64];
            if (c->state == LIVE) on_readable(c, buf);
        }
        if (stop) break;
    }
    stopping = 1;
    if (!snap.taken) snapshot();
    for (int i = 0; i < opt.count; i++) close_conn(&conns[i]);
    FILE *out = fopen(opt.out, "wb");
    if (!out || fwrite(latencies, sizeof *latencies, snap.samples, out) != snap.samples ||
        fclose(out) != 0)
        die(opt.out);
    print_result();
    return 0;
}
