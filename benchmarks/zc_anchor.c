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
 *          uring-copy, uring-zc, uring-fixed[-N]
 *                     io_uring on the raw system calls (<linux/io_uring.h>, no liburing):
 *                     32 (N) requests prepared, then one io_uring_enter submits them and
 *                     the loop reaps until each has its result: IORING_OP_SEND (copy),
 *                     IORING_OP_SEND_ZC with IORING_SEND_ZC_REPORT_USAGE (zc), the same
 *                     from the working set registered once as one fixed buffer
 *                     (IORING_RECVSEND_FIXED_BUF). Notifications are reaped as they come
 *                     (COPIED counted) and drained at the end. A request refused with
 *                     ENOBUFS/ENOMEM is waited for (a notification) and sent again.
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
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/io_uring.h>

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

/* -- io_uring: the least a C program does to send with it ------------------------------ */

struct uring {
    int fd;
    unsigned *sq_tail, *sq_mask, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};

static void uring_setup(struct uring *u) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = 4096;  /* room for the notifications of many requests */
    u->fd = (int)syscall(__NR_io_uring_setup, 64, &p);
    if (u->fd < 0) die("io_uring_setup");
    size_t sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (cq_sz > sq_sz) sq_sz = cq_sz;
        cq_sz = sq_sz;
    }
    char *sq = mmap(0, sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, u->fd,
                    IORING_OFF_SQ_RING);
    if (sq == MAP_FAILED) die("mmap sq");
    char *cq = sq;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
        cq = mmap(0, cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, u->fd,
                  IORING_OFF_CQ_RING);
        if (cq == MAP_FAILED) die("mmap cq");
    }
    u->sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_POPULATE, u->fd, IORING_OFF_SQES);
    if (u->sqes == MAP_FAILED) die("mmap sqes");
    u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    unsigned *array = (unsigned *)(sq + p.sq_off.array);
    for (unsigned i = 0; i < p.sq_entries; i++) array[i] = i;  /* SQE i in slot i */
    u->cq_head = (unsigned *)(cq + p.cq_off.head);
    u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
}

static long uring_enter(struct uring *u, unsigned submit, unsigned wait) {
    for (;;) {
        long r = syscall(__NR_io_uring_enter, u->fd, submit, wait,
                         wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
        if (r >= 0 || errno != EINTR) return r;
    }
}

/* Reap every CQE ready; returns how many results (not notifications) it saw, and
   counts bytes, notifications and copies. A result without F_MORE on a zero-copy request
   means no notification follows; *refused counts ENOBUFS/ENOMEM results. */
static unsigned uring_reap(struct uring *u, int zerocopy, struct counts *c, unsigned *notifs,
                           unsigned *refused) {
    unsigned head = *u->cq_head, results = 0;
    while (head != __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE)) {
        struct io_uring_cqe *cqe = &u->cqes[head & *u->cq_mask];
        if (cqe->flags & IORING_CQE_F_NOTIF) {
            c->completions++;
            if ((uint32_t)cqe->res & IORING_NOTIF_USAGE_ZC_COPIED) c->copied++;
            (*notifs)--;
        } else {
            results++;
            if (cqe->res == -ENOBUFS || cqe->res == -ENOMEM) {
                (*refused)++;
            } else if (cqe->res < 0) {
                errno = -cqe->res;
                die("io_uring send");
            } else {
                c->bytes += cqe->res;
                c->calls++;
                if (zerocopy) c->zerocopy_calls++;
            }
            if (zerocopy && !(cqe->flags & IORING_CQE_F_MORE)) (*notifs)--;
        }
        head++;
    }
    __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
    return results;
}

/* The ring, with the working set registered as fixed buffer 0 when `fixed` (before
   the timed loop: its pages are pinned here, once). */
static void uring_open(struct uring *u, char *buf, size_t workset, int fixed) {
    uring_setup(u);
    if (fixed) {
        struct iovec iov = {.iov_base = buf, .iov_len = workset};
        if (syscall(__NR_io_uring_register, u->fd, IORING_REGISTER_BUFFERS, &iov, 1) < 0)
            die("IORING_REGISTER_BUFFERS");
    }
}

/* The io_uring loops: `per_enter` requests per io_uring_enter, each waited for. */
static void uring_loop(struct uring *up, int fd, char *buf, size_t size, size_t workset,
                       double end, int zerocopy, int fixed, unsigned per_enter, struct counts *c) {
    struct uring u = *up;
    unsigned notifs = 0, refused = 0, tail = *u.sq_tail;
    size_t off = 0;
    for (;;) {
        for (unsigned i = 0; i < per_enter; i++) {
            struct io_uring_sqe *sqe = &u.sqes[tail & *u.sq_mask];
            memset(sqe, 0, sizeof *sqe);
            sqe->opcode = zerocopy ? IORING_OP_SEND_ZC : IORING_OP_SEND;
            sqe->fd = fd;
            sqe->addr = (uint64_t)(uintptr_t)(buf + off);
            sqe->len = (unsigned)size;
            sqe->msg_flags = MSG_NOSIGNAL;
            sqe->user_data = c->calls + i;
            if (zerocopy) sqe->ioprio = IORING_SEND_ZC_REPORT_USAGE;
            if (fixed) {
                sqe->ioprio |= IORING_RECVSEND_FIXED_BUF;
                sqe->buf_index = 0;
            }
            tail++;
            off += size;
            if (off + size > workset) off = 0;
        }
        if (zerocopy) notifs += per_enter;
        __atomic_store_n(u.sq_tail, tail, __ATOMIC_RELEASE);
        if (uring_enter(&u, per_enter, 0) < 0) die("io_uring_enter");
        unsigned results = uring_reap(&u, zerocopy, c, &notifs, &refused);
        while (results < per_enter) {
            if (uring_enter(&u, 0, 1) < 0 && errno != ETIME) die("io_uring_enter (wait)");
            results += uring_reap(&u, zerocopy, c, &notifs, &refused);
        }
        if (refused) {  /* pinned-memory limits: wait for a notification, send on */
            c->enobufs += refused;
            refused = 0;
            if (notifs && uring_enter(&u, 0, 1) < 0) die("io_uring_enter (refused)");
            uring_reap(&u, zerocopy, c, &notifs, &refused);
        }
        if (monotonic() >= end) break;
    }
    double limit = monotonic() + DRAIN_LIMIT_S;
    while (notifs) {
        if (monotonic() > limit) {
            fprintf(stderr, "zc_anchor: %u notifications missing after %.0f s\n", notifs,
                    DRAIN_LIMIT_S);
            exit(1);
        }
        if (uring_enter(&u, 0, 1) < 0) die("io_uring_enter (drain)");
        uring_reap(&u, zerocopy, c, &notifs, &refused);
    }
}

int main(int argc, char **argv) {
    if (argc != 6) usage("wrong number of arguments");
    size_t size = number(argv[2], "bad SIZE");
    size_t workset = number(argv[3], "bad WORKSET");
    double seconds = strtod(argv[4], NULL);
    int zerocopy, uring = 0, fixed = 0;
    unsigned per_enter = BATCH;
    if (strcmp(argv[5], "copy") == 0) zerocopy = 0;
    else if (strcmp(argv[5], "zerocopy") == 0) zerocopy = 1;
    else if (strcmp(argv[5], "uring-copy") == 0) zerocopy = 0, uring = 1;
    else if (strcmp(argv[5], "uring-zc") == 0) zerocopy = 1, uring = 1;
    else if (strncmp(argv[5], "uring-fixed", 11) == 0) {
        zerocopy = uring = fixed = 1;
        if (argv[5][11] == '-') per_enter = (unsigned)number(argv[5] + 12, "bad uring-fixed-N");
        else if (argv[5][11]) usage("MODE must be copy, zerocopy, uring-copy, uring-zc or uring-fixed[-N]");
        if (per_enter == 0 || per_enter > 32) usage("uring-fixed-N: 1 <= N <= 32");
    } else usage("MODE must be copy, zerocopy, uring-copy, uring-zc or uring-fixed[-N]");
    if (size == 0 || workset < size || !(seconds > 0)) usage("need 0 < SIZE <= WORKSET, SECONDS > 0");

    int fd = open_target(argv[1]);
    /* Page-aligned, every page written (not the shared zero page): real memory, as the
       Python runners' buffer. */
    char *buf;
    if (posix_memalign((void **)&buf, 4096, workset)) die("posix_memalign");
    memset(buf, 0x5a, workset);
    if (zerocopy && !uring) {
        int one = 1;
        if (setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) < 0) die("SO_ZEROCOPY");
    }
    int flags = zerocopy ? MSG_ZEROCOPY : 0;
    struct counts c = {0};
    size_t off = 0;

    struct uring u;
    if (uring) uring_open(&u, buf, workset, fixed);
    double cpu0 = cpu_seconds(), t0 = monotonic(), end = t0 + seconds;
    if (uring) {
        uring_loop(&u, fd, buf, size, workset, end, zerocopy, fixed, per_enter, &c);
        double wall = monotonic() - t0, cpu = cpu_seconds() - cpu0;
        printf("{\"bytes\": %llu, \"calls\": %llu, \"cpu_s\": %.6f, \"wall_s\": %.6f, "
               "\"zerocopy_calls\": %llu, \"completions\": %llu, \"copied\": %llu, "
               "\"enobufs\": %llu}\n",
               c.bytes, c.calls, cpu, wall, c.zerocopy_calls, c.completions, c.copied, c.enobufs);
        return 0;
    }
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
