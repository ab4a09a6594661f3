/* Closed-loop HTTP/1.1 load generator for Unix sockets and TCP: one thread, epoll.
 *
 *   loadgen ADDRESS REQUEST_FILE CONCURRENCY SECONDS WARMUP_SECONDS [SAMPLES_FILE]
 *
 * ADDRESS is a socket path or HOST:PORT. Every connection sends the bytes of REQUEST_FILE,
 * waits for the whole response (Content-Length framing, keep-alive), records the latency and
 * sends again. Prints one JSON line: requests, errors (non-200 or broken), rps, p50/p99/p999 us.
 * The same binary drives every server in bench/serving.py, so the client side costs the same.
 * With SAMPLES_FILE, every measured request is also written there as a text line
 * "END_SECONDS LATENCY_US STATUS" (monotonic clock) so a caller can cut time windows.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define BUF 1048576
#define MAXLAT 20000000

typedef struct {
    int fd;
    char *buf;
    size_t have;
    double sent_at;
} conn_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int connect_to(const char *addr) {
    int fd;
    const char *colon = strrchr(addr, ':');
    if (addr[0] == '/' || addr[0] == '.' || !colon) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        strncpy(sa.sun_path, addr, sizeof(sa.sun_path) - 1);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) { perror("connect"); exit(2); }
    } else {
        char host[256];
        size_t n = colon - addr;
        memcpy(host, addr, n); host[n] = 0;
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(colon + 1))};
        inet_pton(AF_INET, host, &sa.sin_addr);
        fd = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) { perror("connect"); exit(2); }
    }
    return fd;
}

static int cmp(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Returns the length of a complete response in buf, 0 if incomplete; sets *status. */
static size_t complete(const char *buf, size_t have, int *status) {
    const char *end = memmem(buf, have, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = end - buf + 4;
    *status = atoi(buf + 9);
    /* Preceded by CRLF, so Inference-Header-Content-Length never matches. */
    const char *cl = memmem(buf, head, "\r\nContent-Length:", 17);
    if (!cl) cl = memmem(buf, head, "\r\ncontent-length:", 17);
    size_t body = cl ? strtoul(cl + 17, NULL, 10) : 0;
    return have >= head + body ? head + body : 0;
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: loadgen ADDR REQFILE CONC SECONDS WARMUP [SAMPLES]\n");
        return 2;
    }
    FILE *samples = argc == 7 ? fopen(argv[6], "w") : NULL;
    const char *addr = argv[1];
    FILE *f = fopen(argv[2], "rb");
    if (!f) { perror("request file"); return 2; }
    static char req[BUF];
    size_t reqlen = fread(req, 1, sizeof(req), f);
    fclose(f);
    int conc = atoi(argv[3]);
    double seconds = atof(argv[4]), warmup = atof(argv[5]);
    float *lat = malloc(sizeof(float) * MAXLAT);
    size_t nlat = 0, errors = 0;
    int ep = epoll_create1(0);
    conn_t *conns = calloc(conc, sizeof(conn_t));
    double start = now_s();
    for (int i = 0; i < conc; i++) {
        conns[i].fd = connect_to(addr);
        conns[i].buf = malloc(BUF);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
        conns[i].sent_at = now_s();
        if (write(conns[i].fd, req, reqlen) != (ssize_t)reqlen) { perror("write"); return 2; }
    }
    double measure_from = start + warmup, stop = measure_from + seconds;
    struct epoll_event events[256];
    while (1) {
        double t = now_s();
        if (t >= stop) break;
        int n = epoll_wait(ep, events, 256, 100);
        for (int k = 0; k < n; k++) {
            conn_t *c = &conns[events[k].data.u32];
            ssize_t r = read(c->fd, c->buf + c->have, BUF - c->have);
            if (r <= 0) {
                fprintf(stderr, "connection closed by server\n");
                errors++;
                if (samples) fprintf(samples, "%.6f -1 0\n", now_s());
                goto done;
            }
            c->have += r;
            int status = 0;
            size_t used = complete(c->buf, c->have, &status);
            if (!used) continue;
            double t2 = now_s();
            if (t2 >= measure_from && t2 < stop) {
                if (status != 200) errors++;
                if (nlat < MAXLAT) lat[nlat++] = (float)((t2 - c->sent_at) * 1e6);
                if (samples) fprintf(samples, "%.6f %.1f %d\n", t2, (t2 - c->sent_at) * 1e6, status);
            }
            memmove(c->buf, c->buf + used, c->have - used);
            c->have -= used;
            c->sent_at = now_s();
            if (write(c->fd, req, reqlen) != (ssize_t)reqlen) { perror("write"); errors++; goto done; }
        }
    }
done:
    if (samples) fclose(samples);
    qsort(lat, nlat, sizeof(float), cmp);
    double p50 = nlat ? lat[nlat / 2] : 0, p99 = nlat ? lat[(size_t)(nlat * 0.99)] : 0;
    double p999 = nlat ? lat[(size_t)(nlat * 0.999)] : 0;
    printf("{\"requests\": %zu, \"errors\": %zu, \"rps\": %.1f, \"p50_us\": %.1f, "
           "\"p99_us\": %.1f, \"p999_us\": %.1f}\n",
           nlat, errors, nlat / seconds, p50, p99, p999);
    return 0;
}
