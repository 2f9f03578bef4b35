/* zc_anchor: the C anchor of benchmarks/zerocopy_send.py and `pagefrag bench`.
 *
 * The floor a Python library is measured against: a plain C send loop, copying or
 * MSG_ZEROCOPY, over a connected TCP or UDP socket, cycling through a working set of
 * distinct buffers exactly as the Python runners do (pagefrag.bench.runners: send i
 * takes bytes [i*size, (i+1)*size) of one page-aligned buffer, wrapping to 0 when the
 * next slice would not fit).
 *
 *     zc_anchor TARGET SIZE WORKSET SECONDS MODE
 *
 * TARGET   fd:N             an already-connected socket inherited from the caller
 *          tcp:HOST:PORT    connect a TCP socket (IPv4 or IPv6 numeric host)
 *          udp:HOST:PORT    connect a UDP socket
 * SIZE     bytes per send call
 * WORKSET  bytes of distinct memory cycled through (SIZE: one hot buffer)
 * SECONDS  how long to send
 * MODE     copy       send(fd, p, SIZE, 0) in a loop
 *          zerocopy   SO_ZEROCOPY, then send(..., MSG_ZEROCOPY); completions read from
 *                     MSG_ERRQUEUE every 32 sends; ENOBUFS (optmem or locked-page limit):
 *                     read completions (waiting for POLLERR when none is ready) and
 *                     retry the same send; at the end every completion is drained.
 *
 * Prints one JSON line on stdout: bytes, calls, cpu_s (this process's user+system time
 * over the loop and final drain), wall_s (the same span), zerocopy_calls, completions
 * (send calls the kernel reported released), copied (of those, how many it copied:
 * SO_EE_CODE_ZEROCOPY_COPIED) and enobufs (refused calls retried). Exit status 1 and a
 * message on stderr on any failure; 2 on bad arguments.
 *
 * Build: cc -O2 -o zc_anchor zc_anchor.c (pagefrag.bench.anchor does it at benchmark time).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <time.h> /* before linux/errqueue.h, which uses struct timespec */
#include <linux/errqueue.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif
#ifndef SO_EE_ORIGIN_ZEROCOPY
#define SO_EE_ORIGIN_ZEROCOPY 5
#endif
#ifndef SO_EE_CODE_ZEROCOPY_COPIED
#define SO_EE_CODE_ZEROCOPY_COPIED 1
#endif

#define BATCH 32            /* sends between completion reads and clock reads */
#define DRAIN_LIMIT_S 30.0  /* the final drain gives up after this long */

struct counts {
    unsigned long long bytes, calls, zerocopy_calls, completions, copied, enobufs;
};

static void die(const char *what) {
    fprintf(stderr, "zc_anchor: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void usage(const char *why) {
    fprintf(stderr, "zc_anchor: %s\nusage: zc_anchor fd:N|tcp:HOST:PORT|udp:HOST:PORT "
                    "SIZE WORKSET SECONDS copy|zerocopy\n", why);
    exit(2);
}

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static unsigned long long number(const char *text, const char *what) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-') usage(what);
    return v;
}

static int open_target(const char *target) {
    if (strncmp(target, "fd:", 3) == 0) return (int)number(target + 3, "bad fd");
    int type;
    if (strncmp(target, "tcp:", 4) == 0) type = SOCK_STREAM;
    else if (strncmp(target, "udp:", 4) == 0) type = SOCK_DGRAM;
    else usage("TARGET must be fd:N, tcp:HOST:PORT or udp:HOST:PORT");
    char host[256];
    const char *rest = target + 4, *colon = strrchr(rest, ':');
    if (!colon || colon == rest || (size_t)(colon - rest) >= sizeof host) usage("bad HOST:PORT");
    memcpy(host, rest, colon - rest);
    host[colon - rest] = 0;
    struct addrinfo hints = {.ai_socktype = type, .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai;
    int err = getaddrinfo(host, colon + 1, &hints, &ai);
    if (err) {
        fprintf(stderr, "zc_anchor: %s: %s\n", target, gai_strerror(err));
        exit(1);
    }
    int fd = socket(ai->ai_family, ai->ai_socktype, 0);
    if (fd < 0) die("socket");
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) die("connect");
    freeaddrinfo(ai);
    return fd;
}

/* Read every completion ready on the error queue (never blocks). */
static void read_completions(int fd, struct counts *c) {
    char control[128];
    for (;;) {
        struct msghdr msg = {.msg_control = control, .msg_controllen = sizeof control};
        if (recvmsg(fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno == EINTR) continue;
            die("recvmsg(MSG_ERRQUEUE)");
        }
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            struct sock_extended_err ee;
            if (cm->cmsg_len < CMSG_LEN(sizeof ee)) continue;
            memcpy(&ee, CMSG_DATA(cm), sizeof ee);
            if (ee.ee_origin != SO_EE_ORIGIN_ZEROCOPY) {
                errno = ee.ee_errno;
                die("error queue");
            }
            unsigned long long n = (uint32_t)(ee.ee_data - ee.ee_info) + 1ULL;
            c->completions += n;
            if (ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED) c->copied += n;
        }
    }
}

/* Wait up to timeout_ms for the error queue to hold something, then read it. */
static void wait_completions(int fd, struct counts *c, int timeout_ms) {
    struct pollfd p = {.fd = fd, .events = 0};  /* POLLERR is always reported */
    if (poll(&p, 1, timeout_ms) < 0 && errno != EINTR) die("poll");
    read_completions(fd, c);
}

int main(int argc, char **argv) {
    if (argc != 6) usage("wrong number of arguments");
    size_t size = number(argv[2], "bad SIZE");
    size_t workset = number(argv[3], "bad WORKSET");
    double seconds = strtod(argv[4], NULL);
    int zerocopy;
    if (strcmp(argv[5], "copy") == 0) zerocopy = 0;
    else if (strcmp(argv[5], "zerocopy") == 0) zerocopy = 1;
    else usage("MODE must be copy or zerocopy");
    if (size == 0 || workset < size || !(seconds > 0)) usage("need 0 < SIZE <= WORKSET, SECONDS > 0");

    int fd = open_target(argv[1]);
    /* Page-aligned, every page written (not the shared zero page): real memory, as the
       Python runners' buffer. */
    char *buf;
    if (posix_memalign((void **)&buf, 4096, workset)) die("posix_memalign");
    memset(buf, 0x5a, workset);
    if (zerocopy) {
        int one = 1;
        if (setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) < 0) die("SO_ZEROCOPY");
    }
    int flags = zerocopy ? MSG_ZEROCOPY : 0;
    struct counts c = {0};
    size_t off = 0;

    double cpu0 = cpu_seconds(), t0 = monotonic(), end = t0 + seconds;
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            ssize_t n = send(fd, buf + off, size, flags);
            if (n < 0) {
                if (errno == EINTR) { i--; continue; }
                if (zerocopy && errno == ENOBUFS) {
                    c.enobufs++;
                    wait_completions(fd, &c, 100);
                    i--;
                    continue;
                }
                die("send");
            }
            c.bytes += n;
            c.calls++;
            off += size;
            if (off + size > workset) off = 0;
        }
        if (zerocopy) read_completions(fd, &c);
        if (monotonic() >= end) break;
    }
    if (zerocopy) {
        c.zerocopy_calls = c.calls;
        double limit = monotonic() + DRAIN_LIMIT_S;
        while (c.completions < c.calls) {
            if (monotonic() > limit) {
                fprintf(stderr, "zc_anchor: %llu of %llu completions after %.0f s\n",
                        c.completions, c.calls, DRAIN_LIMIT_S);
                return 1;
            }
            wait_completions(fd, &c, 100);
        }
    }
    double wall = monotonic() - t0, cpu = cpu_seconds() - cpu0;
    printf("{\"bytes\": %llu, \"calls\": %llu, \"cpu_s\": %.6f, \"wall_s\": %.6f, "
           "\"zerocopy_calls\": %llu, \"completions\": %llu, \"copied\": %llu, "
           "\"enobufs\": %llu}\n",
           c.bytes, c.calls, cpu, wall, c.zerocopy_calls, c.completions, c.copied, c.enobufs);
    return 0;
}
