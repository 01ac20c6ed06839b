/* The timing baseline of bench_play.py: the least any sender has to do to replay a schedule of
 * keep-alive requests at their deadlines, in C.
 *
 * It reads a schedule (lines "offset_ns connection uri", in time order), opens one connection
 * per recorded connection to 127.0.0.1:PORT, and sends each request (a GET of its uri) at
 * start + offset / speed, as replay play does: per connection in order, the next request only
 * after the previous answer (keep-alive, no pipelining); a request whose connection still waits
 * for an answer at its deadline is *held* and goes as soon as the answer comes. Its waits are a
 * timerfd in one epoll set with the sockets (no spin), so it uses almost no CPU of its own.
 *
 * Prints one JSON object: the lateness of every send (send - deadline) and of those not held,
 * in ms (p50, p99, max), the count held, the answers, the run's start (Unix ns) and its CPU.
 *
 * Usage: timed_sender SCHEDULE PORT SPEED
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define TIMER_KEY 0xffffffffu
#define RXBUF (1 << 20)

typedef struct { int64_t d; int conn; char *req; int len; } Req;
typedef struct {
    int fd, busy, next, n, cap;      /* next: index into its own list of requests */
    int *list;
    char *rx; size_t rxn;
    int64_t sent_at;
} Conn;

static int64_t mono(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static void die(const char *what) { fprintf(stderr, "timed_sender: %s: %s\n", what, strerror(errno)); exit(1); }

/* one whole answer at the start of c->rx: its length, or 0 if not all there yet */
static size_t answer_length(Conn *c) {
    char *end = memmem(c->rx, c->rxn, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - c->rx) + 4, body = 0;
    for (char *p = c->rx; p < end; ) {
        char *eol = memmem(p, (size_t)(end - p) + 2, "\r\n", 2);
        if (!eol) break;
        if ((size_t)(eol - p) > 15 && strncasecmp(p, "content-length:", 15) == 0)
            body = strtoul(p + 15, NULL, 10);
        p = eol + 2;
    }
    return c->rxn >= head + body ? head + body : 0;
}

static void print_ms(const char *name, int64_t *v, int n, const char *tail) {
    if (n == 0) { printf("\"%s\": null%s", name, tail); return; }
    qsort(v, n, sizeof *v, cmp64);
    int k = (int)((n * 99LL + 99) / 100) - 1;        /* nearest rank, as bench_play's pct() */
    printf("\"%s\": {\"p50\": %.4f, \"p99\": %.4f, \"max\": %.4f}%s",
           name, v[(n + 1) / 2 - 1] / 1e6, v[k] / 1e6, v[n - 1] / 1e6, tail);
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: timed_sender SCHEDULE PORT SPEED\n"); return 2; }
    FILE *f = fopen(argv[1], "r");
    if (!f) die(argv[1]);
    int port = atoi(argv[2]);
    double speed = atof(argv[3]);
    int n = 0, cap = 1024, nconn = 0;
    Req *rs = malloc(sizeof(Req) * cap);
    long long off;
    int c;
    char uri[2048], line[4096];
    while (fscanf(f, "%lld %d %2047s", &off, &c, uri) == 3) {
        if (n == cap) { cap *= 2; rs = realloc(rs, sizeof(Req) * cap); }
        rs[n].d = (int64_t)(off / speed);
        rs[n].conn = c;
        if (c + 1 > nconn) nconn = c + 1;
        rs[n].len = snprintf(line, sizeof line, "GET %s HTTP/1.1\r\nHost: bench.example\r\n"
                             "User-Agent: bench-play/1.0\r\nAccept: */*\r\n\r\n", uri);
        rs[n].req = strdup(line);
        n++;
    }
    fclose(f);
    Conn *cs = calloc(nconn, sizeof(Conn));
    for (int i = 0; i < n; i++) {
        Conn *k = &cs[rs[i].conn];
        if (k->n == k->cap) { k->cap = k->cap ? k->cap * 2 : 64; k->list = realloc(k->list, sizeof(int) * k->cap); }
        k->list[k->n++] = i;
    }
    int ep = epoll_create1(0), tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    if (ep < 0 || tfd < 0) die("epoll/timerfd");
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = TIMER_KEY};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    for (int k = 0; k < nconn; k++) {
        int one = 1;
        cs[k].fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(cs[k].fd, (struct sockaddr *)&sa, sizeof sa)) die("connect");
        setsockopt(cs[k].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(cs[k].fd, F_SETFL, O_NONBLOCK);
        cs[k].rx = malloc(RXBUF);
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = (uint32_t)k};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[k].fd, &e);
    }
    int64_t *late = malloc(sizeof(int64_t) * n), *free_late = malloc(sizeof(int64_t) * n);
    char *held = calloc(n, 1);
    int nheld = 0, answered = 0, nfree = 0, g = 0;
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    int64_t start = mono() + 50000000LL;
    int64_t start_unix = (int64_t)wall.tv_sec * 1000000000LL + wall.tv_nsec + 50000000LL;

#define SEND(i) do { \
        int i_ = (i); Conn *k_ = &cs[rs[i_].conn]; int64_t t_ = mono(); \
        if (send(k_->fd, rs[i_].req, rs[i_].len, MSG_NOSIGNAL) != rs[i_].len) die("send"); \
        late[i_] = t_ - (start + rs[i_].d); \
        if (!held[i_]) free_late[nfree++] = late[i_]; \
        k_->sent_at = t_; k_->busy = 1; k_->next++; \
    } while (0)

    int64_t give_up = start + (n ? rs[n - 1].d : 0) + 30000000000LL;
    while (answered < n) {
        int64_t t = mono();
        if (t > give_up) { fprintf(stderr, "timed_sender: answers missing after 30 s\n"); return 1; }
        for (; g < n && start + rs[g].d <= t; g++) {
            Conn *k = &cs[rs[g].conn];
            if (!k->busy && k->list[k->next] == g) SEND(g);
            else { held[g] = 1; nheld++; }
            t = mono();
        }
        if (g < n) {
            struct itimerspec its = {0};
            int64_t at = start + rs[g].d;
            its.it_value.tv_sec = at / 1000000000LL;
            its.it_value.tv_nsec = at % 1000000000LL;
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
        }
        struct epoll_event evs[64];
        int m = epoll_wait(ep, evs, 64, 1000);
        if (m < 0 && errno != EINTR) die("epoll_wait");
        for (int j = 0; j < m; j++) {
            uint32_t key = evs[j].data.u32;
            if (key == TIMER_KEY) { uint64_t x; if (read(tfd, &x, 8) < 0) {} continue; }
            Conn *k = &cs[key];
            for (;;) {
                ssize_t r = recv(k->fd, k->rx + k->rxn, RXBUF - k->rxn, 0);
                if (r == 0) { fprintf(stderr, "timed_sender: the target closed a connection\n"); return 1; }
                if (r < 0) { if (errno == EAGAIN || errno == EINTR) break; die("recv"); }
                k->rxn += (size_t)r;
                size_t a;
                while ((a = answer_length(k)) > 0) {
                    memmove(k->rx, k->rx + a, k->rxn - a);
                    k->rxn -= a;
                    answered++;
                    k->busy = 0;
                    if (k->next < k->n) {          /* its next request, held and now due */
                        int i = k->list[k->next];
                        if (i < g) SEND(i);
                    }
                }
                if (k->rxn == RXBUF) { fprintf(stderr, "timed_sender: an answer over 1 MiB\n"); return 1; }
            }
        }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"requests\": %d, \"answered\": %d, \"held\": %d, \"start_unix_ns\": %lld, ",
           n, answered, nheld, (long long)start_unix);
    printf("\"cpu_user_s\": %.3f, \"cpu_sys_s\": %.3f, ",
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6, ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
    print_ms("lateness_ms", late, n, ", ");
    print_ms("lateness_not_held_ms", free_late, nfree, "}\n");
    return 0;
}
