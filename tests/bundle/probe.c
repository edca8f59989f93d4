/* The test program run inside real containers by tests/bundle: it tries what a
 * function container must and must not be able to do and prints one JSON object.
 * Built with gcc -static, so the rootfs needs nothing but this file.
 *
 *   probe checks       everything below that returns at once
 *   probe fork         fork until fork fails; {"forked": N} (children wait on a pipe)
 *   probe alloc MIB    touch MIB MiB of memory; {"allocated": MIB} if not killed
 *   probe pause        print "ready" and wait for a signal
 *   probe cat FILE     copy FILE to stdout
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_io_uring_setup
#define SYS_io_uring_setup 425
#endif

static int first = 1;

static void key(const char *k) {
    printf("%s\"%s\":", first ? "{" : ",", k);
    first = 0;
}

static void str(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20 || c > 0x7e) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static void kint(const char *k, long long v) { key(k); printf("%lld", v); }
static void kstr(const char *k, const char *v) { key(k); str(v); }

/* errno of a call: 0 when it succeeded. */
static int err(long ret) { return ret < 0 ? errno : 0; }

/* errno of a call that returns an fd, which is closed: the fd listing must show only
 * what the container was started with. */
static int err_fd(int fd) {
    if (fd < 0) return errno;
    close(fd);
    return 0;
}

/* Lists a directory; returns the fd the listing itself used. */
static int list_dir(const char *k, const char *path, int numeric_only) {
    key(k);
    putchar('[');
    DIR *d = opendir(path);
    int n = 0, used = -1;
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            if (numeric_only && (e->d_name[0] < '0' || e->d_name[0] > '9')) continue;
            if (n++) putchar(',');
            str(e->d_name);
        }
        used = dirfd(d);
        closedir(d);
    }
    putchar(']');
    return used;
}

static void status_fields(void) {
    static const char *want[] = {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                 "NoNewPrivs", "Seccomp", NULL};
    char line[512];
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        char *colon = strchr(line, ':');
        if (!colon) continue;
        *colon = 0;
        for (int i = 0; want[i]; i++) {
            if (strcmp(line, want[i]) == 0) {
                char *v = colon + 1;
                while (*v == ' ' || *v == '\t') v++;
                v[strcspn(v, "\n")] = 0;
                kstr(want[i], v);
            }
        }
    }
    fclose(f);
}

static void netdevs(void) {
    char line[512];
    int n = 0;
    key("netdevs");
    putchar('[');
    FILE *f = fopen("/proc/net/dev", "r");
    for (int i = 0; f && fgets(line, sizeof line, f); i++) {
        char *colon = strchr(line, ':');
        if (i < 2 || !colon) continue; /* two header lines */
        *colon = 0;
        char *name = line;
        while (*name == ' ') name++;
        if (n++) putchar(',');
        str(name);
    }
    if (f) fclose(f);
    putchar(']');
}

static int control_socket(void) {
    const char *path = getenv("FAAS_CONTROL_SOCKET");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!path || strlen(path) >= sizeof addr.sun_path) return ENOENT;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0) return errno;
    int e = err(connect(fd, (struct sockaddr *)&addr, sizeof addr));
    if (e == 0) e = err(send(fd, "hello", 5, 0));
    close(fd);
    return e;
}

static long read_count(const char *path) {
    char buf[4096];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    long total = 0, n;
    while ((n = read(fd, buf, sizeof buf)) > 0) total += n;
    close(fd);
    return n < 0 ? -errno : total;
}

static void *thread_main(void *arg) { return arg; }

static int thread_works(void) {
    pthread_t t;
    void *out = NULL;
    int e = pthread_create(&t, NULL, thread_main, (void *)42);
    if (e) return e;
    pthread_join(t, &out);
    return out == (void *)42 ? 0 : EINVAL;
}

static void syscalls(void) {
    /* Each must be refused by seccomp with EPERM (clone3: ENOSYS, so libc falls back). */
    kint("unshare_newuser", err(unshare(CLONE_NEWUSER)));
    kint("unshare_newns", err(unshare(CLONE_NEWNS)));
    long cloned = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
    if (cloned == 0) _exit(0); /* the child of a stackless clone runs on here: end it */
    if (cloned > 0) waitpid(cloned, NULL, 0);
    kint("clone_newuser", err(cloned));
    kint("clone3", err(syscall(SYS_clone3, NULL, 0)));
    kint("mount", err(mount("none", "/tmp", "tmpfs", 0, "")));
    kint("keyctl", err(syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0, 0, 0)));
    kint("ptrace", err(ptrace(PTRACE_TRACEME, 0, NULL, NULL)));
    kint("io_uring_setup", err_fd(syscall(SYS_io_uring_setup, 1, NULL)));
    kint("socket_vsock", err_fd(socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0)));
    kint("personality_linux32", err(personality(PER_LINUX32)));
    kint("personality_bad", err(personality(0x0040000 /* ADDR_NO_RANDOMIZE */)));
    /* and these must work */
    kint("personality_query", err(personality(0xffffffff)));
    kint("socket_inet", err_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)));
    pid_t child = fork();
    if (child == 0) _exit(0);
    kint("fork", child < 0 ? errno : (waitpid(child, NULL, 0), 0));
    kint("thread", thread_works()); /* clone3 is ENOSYS: libc must fall back to clone */
}

static void checks(void) {
    struct rlimit rl;
    struct utsname un;
    struct statvfs sv;
    gid_t groups[64];
    char cwd[512];

    kint("uid", getuid());
    kint("gid", getgid());
    int ng = getgroups(64, groups);
    key("groups");
    putchar('[');
    for (int i = 0; i < ng; i++) printf(i ? ",%d" : "%d", (int)groups[i]);
    putchar(']');
    kint("pid", getpid());
    uname(&un);
    kstr("hostname", un.nodename);
    kstr("cwd", getcwd(cwd, sizeof cwd) ? cwd : "");
    getrlimit(RLIMIT_CORE, &rl);
    kint("core_soft", rl.rlim_cur), kint("core_hard", rl.rlim_max);
    getrlimit(RLIMIT_NOFILE, &rl);
    kint("nofile_soft", rl.rlim_cur), kint("nofile_hard", rl.rlim_max);
    status_fields();

    kint("write_root", err_fd(open("/probe-was-here", O_WRONLY | O_CREAT | O_CLOEXEC, 0644)));
    kint("mkdir_root", err(mkdir("/probe-dir", 0755)));
    int fd = open("/tmp/probe", O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    kint("write_tmp", fd < 0 ? errno : err(write(fd, "x", 1)));
    if (fd >= 0) close(fd);
    struct stat st;
    kint("tmp_mode", stat("/tmp", &st) == 0 ? (long long)st.st_mode : -errno);
    kint("sys_readonly", statvfs("/sys", &sv) == 0 && (sv.f_flag & ST_RDONLY));
    kint("proc_sys_write", err_fd(open("/proc/sys/kernel/hostname", O_WRONLY | O_CLOEXEC)));
    kint("proc_timer_list_bytes", read_count("/proc/timer_list"));
    kint("proc_keys_bytes", read_count("/proc/keys"));
    kint("control_socket", control_socket());
    syscalls();
    netdevs();
    list_dir("dev", "/dev", 0);
    list_dir("proc_pids", "/proc", 1);
    /* the fd of this very listing shows up in /proc/self/fd: report it */
    kint("listing_fd", list_dir("fds", "/proc/self/fd", 0));
    key("env");
    putchar('[');
    extern char **environ;
    for (char **e = environ; *e; e++) {
        if (e != environ) putchar(',');
        str(*e);
    }
    putchar(']');
}

static void fork_bomb(void) {
    int pipefd[2], n = 0;
    if (pipe(pipefd) < 0) return;
    for (;;) {
        pid_t pid = fork();
        if (pid < 0) break;
        if (pid == 0) {
            char c;
            close(pipefd[1]);
            read(pipefd[0], &c, 1); /* returns at EOF: when the parent closes its end */
            _exit(0);
        }
        if (++n >= 10000) break;
    }
    int e = errno;
    close(pipefd[1]);
    while (wait(NULL) > 0) {}
    kint("forked", n);
    kint("errno", e);
}

static void alloc(long mib) {
    for (long i = 0; i < mib; i++) {
        char *p = malloc(1 << 20);
        if (!p) break;
        memset(p, 1, 1 << 20); /* touch every page: only used memory counts */
    }
    kint("allocated", mib);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "checks") == 0) checks();
    else if (argc > 1 && strcmp(argv[1], "fork") == 0) fork_bomb();
    else if (argc > 1 && strcmp(argv[1], "pause") == 0) {
        printf("ready\n");
        fflush(stdout);
        for (;;) pause();
    }
    else if (argc > 2 && strcmp(argv[1], "cat") == 0) {
        char buf[4096];
        long n;
        int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
        while (fd >= 0 && (n = read(fd, buf, sizeof buf)) > 0) fwrite(buf, 1, n, stdout);
        return fd < 0;
    }
    else if (argc > 2 && strcmp(argv[1], "alloc") == 0) alloc(atol(argv[2]));
    else {
        fprintf(stderr, "usage: probe checks | fork | alloc MIB | pause | cat FILE\n");
        return 2;
    }
    printf("}\n");
    return 0;
}
