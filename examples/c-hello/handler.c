/* A complete faasd handler in C: one-shot, no library beyond libc.
 *
 * Build:  gcc -static -O2 -o handler handler.c
 * Protocol: docs/handler-protocol.md. It connects to the control socket (being connected
 * means ready), receives one conn packet with the client's TCP socket attached, answers
 * one fixed HTTP response on it, closes it and exits: a one-shot handler is always right.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static const char RESPONSE[] =
    "HTTP/1.1 200 OK\r\n"
    "Content-Type: text/plain\r\n"
    "Content-Length: 18\r\n"
    "Connection: close\r\n"
    "\r\n"
    "hello from C, 42!\n";

/* Is the packet's "type" member "conn"? (A real JSON parser is not needed for this.) */
static int is_conn(const char *packet) {
    const char *p = strstr(packet, "\"type\"");
    if (!p) return 0;
    p += 6;
    while (*p == ' ' || *p == '\t' || *p == ':') p++;
    return strncmp(p, "\"conn\"", 6) == 0;
}

/* The first descriptor of the packet; any others are closed so none leaks. */
static int take_fd(struct msghdr *msg) {
    int fd = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) {
            int got;
            memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof got);
            if (fd < 0) fd = got; else close(got);
        }
    }
    return fd;
}

/* Read the request head, so that closing does not reset a connection with unread data. */
static void read_head(int fd) {
    char buf[8192];
    size_t have = 0;
    ssize_t n;
    while (have < sizeof buf - 1 && (n = read(fd, buf + have, sizeof buf - 1 - have)) > 0) {
        have += (size_t)n;
        buf[have] = 0;
        if (strstr(buf, "\r\n\r\n") || strstr(buf, "\n\n")) break;
    }
}

int main(void) {
    const char *path = getenv("FAAS_CONTROL_SOCKET");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path ? path : "/control.sock", sizeof addr.sun_path - 1);
    int ctl = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (ctl < 0 || connect(ctl, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("connect to the control socket");
        return 1;
    }
    for (;;) {
        char packet[4096];
        union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
        struct iovec iov = {.iov_base = packet, .iov_len = sizeof packet - 1};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = control.buf, .msg_controllen = sizeof control.buf};
        ssize_t n = recvmsg(ctl, &msg, MSG_CMSG_CLOEXEC);
        if (n <= 0) return 0; /* the runner closed the control socket: stop */
        packet[n] = 0;
        int conn = take_fd(&msg);
        if (!is_conn(packet) || conn < 0) { /* an unknown type: ignore it */
            if (conn >= 0) close(conn);
            continue;
        }
        /* O_NONBLOCK belongs to the open file, shared with the runner's copy: clear it
         * for the plain blocking reads and writes below. */
        fcntl(conn, F_SETFL, fcntl(conn, F_GETFL) & ~O_NONBLOCK);
        read_head(conn);
        ssize_t off = 0, len = (ssize_t)sizeof RESPONSE - 1;
        while (off < len && (n = write(conn, RESPONSE + off, (size_t)(len - off))) > 0) off += n;
        shutdown(conn, SHUT_WR);
        close(conn);
        return 0; /* one-shot: exiting is this handler's "done" */
    }
}
