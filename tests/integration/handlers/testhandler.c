/* A handler for the end-to-end tests, written from docs/handler-protocol.md alone.
 *
 * Paths:  /        "ok <n> pid <pid>"         /sleep  never answers (timeout)
 *         /slow    "slow done" after 2 s
 *         /net     its network interfaces      /caps   its effective capabilities
 *         /exit    exits without answering     /fds    the fds it holds
 *         /id      uid gid                      /write  tries to write the rootfs
 *         /put/P   writes "kept" to file /P     /get/P  the contents of /P
 *         /fill/P  writes /P until a write fails: "<error> after <bytes>"
 *         /rm/P    unlinks /P
 *         /fetch/HOST/PORT  "fetched <body>" of http://HOST:PORT/ (2 s), else "error ..."
 *         /secret/NAME  "uid gid mode rw|ro value" of /run/secrets/NAME (rw: it could
 *                  create a file beside it)
 *         /conn    the conn packet it got
 * Not HTTP: "HELLO" first gets the conn packet back, raw, and the connection closed.
 * TEST_MODE (env): noconnect, noread, crash, forkbomb misbehave on purpose.
 * FAAS_REUSE=1: answer "done" and wait for the next connection. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static void reply(int fd, const char *body) {
    char buf[8192];
    int n = snprintf(buf, sizeof buf,
                     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n%s", strlen(body), body);
    write(fd, buf, n);
}

static void secret(const char *name_at, char *out, size_t cap) {
    char name[64] = "", path[128], value[1024] = "";
    struct stat st;
    sscanf(name_at, "%63[a-z0-9-]", name);
    snprintf(path, sizeof path, "/run/secrets/%s", name);
    int f = open(path, O_RDONLY);
    if (f < 0 || fstat(f, &st) < 0) { snprintf(out, cap, "error %s", strerror(errno)); return; }
    ssize_t n = read(f, value, sizeof value - 1);
    value[n > 0 ? n : 0] = 0;
    close(f);
    int w = open("/run/secrets/planted", O_WRONLY | O_CREAT, 0600);
    snprintf(out, cap, "%u %u %o %s %s", (unsigned)st.st_uid, (unsigned)st.st_gid,
             (unsigned)(st.st_mode & 07777), w < 0 ? "ro" : "rw", value);
}

static void fds(char *out, size_t cap) {
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    out[0] = 0;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        if (atoi(e->d_name) == dirfd(d)) continue;
        strncat(out, e->d_name, cap - strlen(out) - 2);
        strncat(out, " ", cap - strlen(out) - 1);
    }
    if (d) closedir(d);
}

/* The names before ':' in /proc/net/dev, or the value after "CapEff:" in status. */
static void proc_field(char *out, size_t len, const char *path, const char *key) {
    FILE *f = fopen(path, "r");
    out[0] = 0;
    if (!f) { snprintf(out, len, "%s", strerror(errno)); return; }
    char line[512];
    size_t used = 0;
    while (fgets(line, sizeof line, f)) {
        char *at = strstr(line, key);
        if (!at) continue;
        char item[256] = "";
        if (!strcmp(key, ":")) { *at = 0; sscanf(line, " %255s", item); }
        else sscanf(at + strlen(key), " %255s", item);
        used += snprintf(out + used, len - used, "%s%s", used ? " " : "", item);
        if (used >= len) break;
    }
    fclose(f);
}

/* The file operations of /put, /get, /fill and /rm on the path after the prefix. */
static int files(const char *req, char *out, size_t cap) {
    char op[8] = "", path[1024] = "";
    if (sscanf(req, "GET /%7[a-z]%1023s", op, path) != 2 || path[0] != '/') return 0;
    if (!strcmp(op, "put")) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || write(fd, "kept", 4) != 4) snprintf(out, cap, "%s", strerror(errno));
        else snprintf(out, cap, "put");
        if (fd >= 0) close(fd);
    } else if (!strcmp(op, "get")) {
        int fd = open(path, O_RDONLY);
        ssize_t n = fd < 0 ? -1 : read(fd, out, cap - 1);
        if (n < 0) snprintf(out, cap, "%s", strerror(errno));
        else out[n] = 0;
        if (fd >= 0) close(fd);
    } else if (!strcmp(op, "fill")) {
        static char chunk[65536];
        long long total = 0;
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        ssize_t n = 0;
        while (fd >= 0 && (n = write(fd, chunk, sizeof chunk)) > 0) total += n;
        if (fd >= 0 && fsync(fd) < 0) n = -1;
        snprintf(out, cap, "%s after %lld", fd < 0 || n < 0 ? strerror(errno) : "no error",
                 total);
        if (fd >= 0) close(fd);
    } else if (!strcmp(op, "rm")) {
        snprintf(out, cap, "%s", unlink(path) < 0 ? strerror(errno) : "removed");
    } else {
        return 0;
    }
    return 1;
}

/* Resolve HOST (getaddrinfo: /etc/hosts, /etc/resolv.conf), connect within 2 s, GET /. */
static void fetch(char *out, size_t cap, const char *host, const char *port) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res, *ai;
    int e = getaddrinfo(host, port, &hints, &res);
    if (e) { snprintf(out, cap, "error resolve: %s", gai_strerror(e)); return; }
    snprintf(out, cap, "error connect: no address");
    for (ai = res; ai; ai = ai->ai_next) {
        int s = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
        if (s < 0) continue;
        struct pollfd p = {s, POLLOUT, 0};
        int err = 0;
        socklen_t len = sizeof err;
        if (connect(s, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) err = errno;
        else if (poll(&p, 1, 2000) != 1) err = ETIMEDOUT;
        else getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { snprintf(out, cap, "error connect: %s", strerror(err)); close(s); continue; }
        fcntl(s, F_SETFL, 0);
        char req[512], buf[4096] = "";
        int n = snprintf(req, sizeof req, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", host);
        write(s, req, n);
        struct pollfd r = {s, POLLIN, 0};
        size_t got = 0;
        while (got < sizeof buf - 1 && poll(&r, 1, 2000) == 1) {
            ssize_t m = read(s, buf + got, sizeof buf - 1 - got);
            if (m <= 0) break;
            got += m;
        }
        buf[got] = 0;
        char *body = strstr(buf, "\r\n\r\n");
        snprintf(out, cap, "fetched %s", body ? body + 4 : "(no body)");
        close(s);
        break;
    }
    freeaddrinfo(res);
}

int main(void) {
    const char *mode = getenv("TEST_MODE");
    const char *path = getenv("FAAS_CONTROL_SOCKET");
    int reuse = getenv("FAAS_REUSE") && !strcmp(getenv("FAAS_REUSE"), "1");
    if (mode && !strcmp(mode, "crash")) return 1;
    if (mode && !strcmp(mode, "noconnect")) { for (;;) pause(); }
    if (mode && !strcmp(mode, "forkbomb")) { for (;;) fork(); }
    int ctl = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, path ? path : "/control.sock", sizeof sa.sun_path - 1);
    if (connect(ctl, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("connect"); return 2; }
    if (mode && !strcmp(mode, "noread")) { for (;;) pause(); }
    for (int served = 1;; served++) {
        char packet[4096], cbuf[CMSG_SPACE(sizeof(int) * 4)];
        struct iovec iov = {packet, sizeof packet - 1};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = cbuf, .msg_controllen = sizeof cbuf};
        ssize_t n = recvmsg(ctl, &msg, MSG_CMSG_CLOEXEC);
        if (n <= 0) return 0; /* the runner closed the control socket: stop */
        packet[n] = 0;
        int conn = -1;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                memcpy(&conn, CMSG_DATA(c), sizeof conn);
        if (!strstr(packet, "\"type\": \"conn\"") || conn < 0) continue; /* unknown: ignore */
        char id[128] = "";
        char *p = strstr(packet, "\"id\": \"");
        if (p) sscanf(p + 7, "%127[^\"]", id);
        char req[2048] = "";
        read(conn, req, sizeof req - 1);
        fprintf(stderr, "request %s\n", id);
        char body[4096];
        if (!strncmp(req, "GET /sleep", 10)) { for (;;) pause(); }
        if (!strncmp(req, "HELLO", 5)) { /* another protocol on another port */
            write(conn, packet, strlen(packet));
            write(conn, "\n", 1);
            close(conn);
            if (!reuse) return 0;
            char done[256];
            int m = snprintf(done, sizeof done, "{\"type\": \"done\", \"id\": \"%s\"}", id);
            send(ctl, done, m, 0);
            continue;
        }
        if (!strncmp(req, "GET /exit", 9)) return 3;
        if (!strncmp(req, "GET /slow", 9)) sleep(2);
        if (!strncmp(req, "GET /fds", 8)) fds(body, sizeof body);
        else if (!strncmp(req, "GET /id", 7)) snprintf(body, sizeof body, "%d %d", getuid(), getgid());
        else if (!strncmp(req, "GET /secret/", 12)) secret(req + 12, body, sizeof body);
        else if (!strncmp(req, "GET /write", 10)) {
            int w = open("/written", O_WRONLY | O_CREAT, 0644);
            snprintf(body, sizeof body, "%s", w < 0 ? strerror(errno) : "written");
        } else if (!strncmp(req, "GET /slow", 9)) snprintf(body, sizeof body, "slow done");
        else if (!strncmp(req, "GET /fetch/", 11)) {
            char host[256] = "", port[16] = "80";
            sscanf(req + 11, "%255[^/ ]/%15[0-9]", host, port);
            fetch(body, sizeof body, host, port);
        } else if (!strncmp(req, "GET /net", 8)) proc_field(body, sizeof body, "/proc/net/dev", ":");
        else if (!strncmp(req, "GET /conn", 9)) snprintf(body, sizeof body, "%s", packet);
        else if (!strncmp(req, "GET /caps", 9)) proc_field(body, sizeof body, "/proc/self/status", "CapEff:");
        else if (files(req, body, sizeof body)) {}
        else snprintf(body, sizeof body, "ok %d pid %d", served, getpid());
        reply(conn, body);
        close(conn);
        if (!reuse) return 0;
        char done[256];
        int m = snprintf(done, sizeof done, "{\"type\": \"done\", \"id\": \"%s\"}", id);
        send(ctl, done, m, 0);
    }
}
