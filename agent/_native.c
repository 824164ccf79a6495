/* agent._native: the per-file work of a tree walk, in one call per file.
 *
 * A bake or ``check --full`` measures every file: open it, read it, hash it, fstat it, list
 * and read its xattrs, close it. In Python each of those is a call with its own objects (a
 * stat result, a bytes object, a hash object, a list of names); here they are one call that
 * builds only what it returns. What it returns is exactly what ``agent.measure`` returns for
 * the same file (that module falls back to its own code where this one is not built, and
 * the tests run both).
 *
 * open_ahead(name, size, dir_fd) -> fd | None
 *     ``measure.open_ahead``: open the regular file ``name`` relative to ``dir_fd`` (-1: none)
 *     with O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC and O_NOATIME where permitted, and
 *     announce its first ``ahead`` bytes to the kernel (POSIX_FADV_WILLNEED).
 *
 * read_open(fd, size, ino, dev, mtime_ns, ctime_ns) -> (hexdigest, xattrs) | None
 *     ``measure.read_open``: the SHA-256 and the xattrs (sorted by name bytes) of the file
 *     open as ``fd`` (always closed), if it is still the regular file of that size, inode,
 *     device, mtime and ctime after it was read; None if not, or on any error (the caller
 *     then measures it the careful way, which records why).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>

#define CHUNK_BYTES (1 << 20)
#define INLINE_BYTES (256 << 10)
#define OPEN_FLAGS (O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)

/* One read buffer per thread, made at its first file and freed when the thread ends. */
static pthread_key_t chunk_key;

static unsigned char *
thread_chunk(void)
{
    unsigned char *chunk = pthread_getspecific(chunk_key);
    if (chunk == NULL) {
        chunk = malloc(CHUNK_BYTES);
        if (chunk != NULL && pthread_setspecific(chunk_key, chunk) != 0) {
            free(chunk);
            chunk = NULL;
        }
    }
    return chunk;
}

static PyObject *
open_ahead(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *name_obj;
    long long size, ahead;
    int dir_fd;
    if (!PyArg_ParseTuple(args, "O&LLi", PyUnicode_FSConverter, &name_obj, &size, &ahead,
                          &dir_fd))
        return NULL;
    const char *name = PyBytes_AS_STRING(name_obj);
    int at = dir_fd >= 0 ? dir_fd : AT_FDCWD;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = openat(at, name, OPEN_FLAGS | O_NOATIME);
    if (fd < 0 && errno == EPERM) /* O_NOATIME needs ownership or CAP_FOWNER */
        fd = openat(at, name, OPEN_FLAGS);
    if (fd >= 0)
        posix_fadvise(fd, 0, size < ahead ? size : ahead, POSIX_FADV_WILLNEED);
    Py_END_ALLOW_THREADS
    Py_DECREF(name_obj);
    if (fd < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(fd);
}

static int
by_bytes(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The xattrs of fd as a tuple of (name, value), sorted by name bytes; NULL with no Python
 * error set on an OS error, NULL with one set on a Python error. */
static PyObject *
read_xattrs(int fd)
{
    char small[1024];
    char *names = small;
    ssize_t len = flistxattr(fd, small, sizeof small);
    if (len < 0 && errno == ERANGE) {
        ssize_t want = flistxattr(fd, NULL, 0);
        if (want < 0)
            return NULL;
        names = malloc((size_t)want + 1);
        if (names == NULL)
            return PyErr_NoMemory();
        len = flistxattr(fd, names, (size_t)want);
    }
    if (len < 0) {
        int saved = errno;
        if (names != small)
            free(names);
        errno = saved;
        return saved == ENOTSUP || saved == ENODATA ? PyTuple_New(0) : NULL;
    }
    if (len == 0) {
        if (names != small)
            free(names);
        return PyTuple_New(0);
    }
    size_t count = 0;
    for (ssize_t i = 0; i < len; i++)
        count += names[i] == '\0';
    const char **sorted = malloc(count * sizeof *sorted);
    PyObject *out = PyList_New(0);
    if (sorted == NULL || out == NULL) {
        free(sorted);
        Py_XDECREF(out);
        if (names != small)
            free(names);
        return PyErr_NoMemory();
    }
    size_t n = 0;
    for (ssize_t i = 0; i < len && n < count; i += (ssize_t)strlen(names + i) + 1)
        sorted[n++] = names + i;
    qsort(sorted, n, sizeof *sorted, by_bytes);
    int failed = 0; /* 1: an OS error (errno kept), 2: a Python error */
    for (size_t i = 0; i < n && !failed; i++) {
        ssize_t size = fgetxattr(fd, sorted[i], NULL, 0);
        PyObject *value = NULL;
        for (int attempt = 0; size >= 0 && attempt < 4; attempt++) {
            value = PyBytes_FromStringAndSize(NULL, size);
            if (value == NULL)
                break;
            ssize_t got = fgetxattr(fd, sorted[i], PyBytes_AS_STRING(value), (size_t)size);
            if (got >= 0) {
                if (got != size)
                    _PyBytes_Resize(&value, got);
                break;
            }
            Py_CLEAR(value);
            if (errno != ERANGE) { /* grew between the two calls: ask again */
                size = -1;
                break;
            }
            size = fgetxattr(fd, sorted[i], NULL, 0);
        }
        if (value == NULL) {
            if (PyErr_Occurred())
                failed = 2;
            else if (errno != ENODATA) /* removed between list and get: left out */
                failed = 1;
            continue;
        }
        PyObject *name = PyUnicode_DecodeFSDefault(sorted[i]);
        PyObject *pair = name != NULL ? PyTuple_Pack(2, name, value) : NULL;
        Py_XDECREF(name);
        Py_DECREF(value);
        if (pair == NULL || PyList_Append(out, pair) < 0)
            failed = 2;
        Py_XDECREF(pair);
    }
    int saved = errno;
    free(sorted);
    if (names != small)
        free(names);
    if (failed) {
        Py_DECREF(out);
        errno = saved;
        return NULL;
    }
    PyObject *tuple = PyList_AsTuple(out);
    Py_DECREF(out);
    return tuple;
}

static PyObject *
read_open(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd;
    long long size, ino, dev, mtime_ns, ctime_ns;
    if (!PyArg_ParseTuple(args, "iLLLLL", &fd, &size, &ino, &dev, &mtime_ns, &ctime_ns))
        return NULL;
    unsigned char *chunk = thread_chunk();
    if (chunk == NULL) {
        close(fd);
        return PyErr_NoMemory();
    }
    SHA256_CTX ctx;
    long long count = 0;
    int ok = 1;
    struct stat after;
    Py_BEGIN_ALLOW_THREADS
    SHA256_Init(&ctx);
    if (size <= INLINE_BYTES) { /* one read, one byte more than expected: did it grow? */
        ssize_t got = read(fd, chunk, (size_t)size + 1);
        if (got < 0)
            ok = 0;
        else {
            SHA256_Update(&ctx, chunk, (size_t)got);
            count = got;
        }
    } else {
        for (;;) {
            ssize_t got = read(fd, chunk, CHUNK_BYTES);
            if (got < 0) {
                ok = 0;
                break;
            }
            if (got == 0)
                break;
            SHA256_Update(&ctx, chunk, (size_t)got);
            count += got;
        }
    }
    if (ok && fstat(fd, &after) < 0)
        ok = 0;
    Py_END_ALLOW_THREADS
    if (!ok || count != size || !S_ISREG(after.st_mode) || (long long)after.st_ino != ino ||
        (long long)after.st_dev != dev || (long long)after.st_size != size ||
        (long long)after.st_mtim.tv_sec * 1000000000LL + after.st_mtim.tv_nsec != mtime_ns ||
        (long long)after.st_ctim.tv_sec * 1000000000LL + after.st_ctim.tv_nsec != ctime_ns) {
        close(fd);
        Py_RETURN_NONE;
    }
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256_Final(digest, &ctx);
    PyObject *xattrs = read_xattrs(fd);
    close(fd);
    if (xattrs == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE; /* an OS error: measured again, the careful way */
    }
    static const char hexdigits[] = "0123456789abcdef";
    char hex[2 * SHA256_DIGEST_LENGTH];
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        hex[2 * i] = hexdigits[digest[i] >> 4];
        hex[2 * i + 1] = hexdigits[digest[i] & 15];
    }
    PyObject *text = PyUnicode_FromStringAndSize(hex, sizeof hex);
    if (text == NULL) {
        Py_DECREF(xattrs);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, text, xattrs);
    Py_DECREF(text);
    Py_DECREF(xattrs);
    return result;
}

static PyMethodDef methods[] = {
    {"open_ahead", open_ahead, METH_VARARGS, "Open a file to measure and announce it."},
    {"read_open", read_open, METH_VARARGS, "Hash, check and list the xattrs of an open file."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "agent._native",
    .m_doc = "The per-file work of a tree walk (see agent/_native.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    int err = pthread_key_create(&chunk_key, free);
    if (err != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyModule_Create(&module);
}
