/* fail_shim.c - an LD_PRELOAD shim that makes file I/O fail below Python, so native code
 * (the C read-through's pread, the capture's pwrite) meets the errors too.
 *
 * Environment, read at every call:
 *   ZC_SHIM_ARM    unset or "0": pass everything through (the process arms it at runtime
 *                  through os.environ, which calls putenv)
 *   ZC_SHIM_OPS    comma list of pread,pwrite,fsync,fdatasync (default: all)
 *   ZC_SHIM_PATH   fail only descriptors whose /proc/self/fd target contains this text
 *   ZC_SHIM_NTH    fail the Nth matching call (0-based) and every later one (default 0)
 *   ZC_SHIM_ERRNO  errno to fail with (default EIO)
 * Built by tests/reliability/test_native_io.py.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static long matched;

static int should_fail(const char *op, int fd)
{
    const char *arm = getenv("ZC_SHIM_ARM");
    if (arm == NULL || strcmp(arm, "0") == 0 || arm[0] == '\0')
        return 0;
    const char *ops = getenv("ZC_SHIM_OPS");
    if (ops != NULL && ops[0] != '\0') {
        size_t n = strlen(op);
        const char *p = ops;
        int found = 0;
        while ((p = strstr(p, op)) != NULL) {
            if ((p == ops || p[-1] == ',') && (p[n] == ',' || p[n] == '\0')) {
                found = 1;
                break;
            }
            p += n;
        }
        if (!found)
            return 0;
    }
    const char *want = getenv("ZC_SHIM_PATH");
    if (want != NULL && want[0] != '\0') {
        char link[64], target[4096];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t len = readlink(link, target, sizeof target - 1);
        if (len < 0)
            return 0;
        target[len] = '\0';
        if (strstr(target, want) == NULL)
            return 0;
    }
    const char *nth = getenv("ZC_SHIM_NTH");
    long first = nth ? strtol(nth, NULL, 10) : 0;
    if (matched++ < first)
        return 0;
    const char *err = getenv("ZC_SHIM_ERRNO");
    errno = err ? atoi(err) : EIO;
    return 1;
}

#define NEXT(name, type) static type real_##name; if (!real_##name) real_##name = (type)dlsym(RTLD_NEXT, #name)

typedef ssize_t (*pread_t)(int, void *, size_t, off_t);
typedef ssize_t (*pwrite_t)(int, const void *, size_t, off_t);
typedef int (*sync_t)(int);

ssize_t pread(int fd, void *buf, size_t n, off_t pos)
{
    NEXT(pread, pread_t);
    return should_fail("pread", fd) ? -1 : real_pread(fd, buf, n, pos);
}

ssize_t pread64(int fd, void *buf, size_t n, off_t pos)
{
    NEXT(pread64, pread_t);
    return should_fail("pread", fd) ? -1 : real_pread64(fd, buf, n, pos);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t pos)
{
    NEXT(pwrite, pwrite_t);
    return should_fail("pwrite", fd) ? -1 : real_pwrite(fd, buf, n, pos);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t pos)
{
    NEXT(pwrite64, pwrite_t);
    return should_fail("pwrite", fd) ? -1 : real_pwrite64(fd, buf, n, pos);
}

int fsync(int fd)
{
    NEXT(fsync, sync_t);
    return should_fail("fsync", fd) ? -1 : real_fsync(fd);
}

int fdatasync(int fd)
{
    NEXT(fdatasync, sync_t);
    return should_fail("fdatasync", fd) ? -1 : real_fdatasync(fd);
}
