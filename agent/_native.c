/* agent._native: the per-file work of a tree walk, in one call per file.
 *
 * A bake or ``check --full`` measures every file: open it, read it, hash it, fstat it, list
 * and read its xattrs, close it. In Python each of those is a call with its own objects (a
 * stat result, a bytes object, a hash object, a list of names); here they are one call that
 * builds only what it returns. What it returns is exactly what ``agent.measure`` returns for
 * the same file (that module falls back to its own code where this one is not built, and
 * the tests run both).
 *
 * open_ahead(name, size, ahead, dir_fd) -> fd | None
 *     ``measure.open_ahead``: open the regular file ``name`` relative to ``dir_fd`` (-1: none)
 *     with O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC and O_NOATIME where permitted, and
 *     announce its first ``ahead`` bytes to the kernel (POSIX_FADV_WILLNEED).
 *
 * read_open(fd, size, ino, dev, mtime_ns, ctime_ns) -> (hexdigest, xattrs) | None
 *     ``measure.read_open``: the SHA-256 and the xattrs (sorted by name bytes) of the file
 *     open as ``fd`` (always closed), if it is still the regular file of that size, inode,
 *     device, mtime and ctime after it was read; None if not, or on any error (the caller
 *     then measures it the careful way, which records why).
 *
 * The file is hostile input: it may change, grow, shrink or be swapped at any moment, and its
 * xattrs with it. So no read goes past one byte more than ``size``; every kernel answer about
 * a length is checked against the buffer it was given; and every system call (the reads, the
 * xattrs, the close) runs with the interpreter lock released, the Python objects made after.
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
#define ATTEMPTS 4 /* a list or value that keeps changing size between query and read */
#define NS 1000000000LL

/* One read buffer per thread, made at its first file and freed when the thread ends. */
static pthread_key_t chunk_key;
static pthread_once_t chunk_once = PTHREAD_ONCE_INIT;
static int chunk_key_error;

static void
make_chunk_key(void)
{
    chunk_key_error = pthread_key_create(&chunk_key, free);
}

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
    long long length = size < ahead ? size : ahead;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = openat(at, name, OPEN_FLAGS | O_NOATIME);
    if (fd < 0 && (errno == EPERM || errno == EACCES)) /* O_NOATIME: owner or CAP_FOWNER */
        fd = openat(at, name, OPEN_FLAGS);
    if (fd >= 0 && length > 0) /* (a length of 0 would mean the whole file) */
        posix_fadvise(fd, 0, (off_t)length, POSIX_FADV_WILLNEED);
    Py_END_ALLOW_THREADS
    Py_DECREF(name_obj);
    if (fd < 0)
        Py_RETURN_NONE;
    PyObject *out = PyLong_FromLong(fd);
    if (out == NULL)
        close(fd);
    return out;
}

/* --- xattrs, read without the interpreter lock ------------------------------------------ */

struct xattrs {
    char *list;       /* the names, NUL-terminated one after another */
    char **names;     /* into list, sorted by their bytes */
    char **values;    /* malloc'd, one per name; NULL: removed meanwhile (left out) */
    ssize_t *lengths; /* of each value */
    size_t count;
};

static void
xattrs_free(struct xattrs *x)
{
    for (size_t i = 0; x->values != NULL && i < x->count; i++)
        free(x->values[i]);
    free(x->values);
    free(x->lengths);
    free(x->names);
    free(x->list);
    memset(x, 0, sizeof *x);
}

static int
by_bytes(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The names of fd's xattrs into x->list (length in *len); 0, or -1 with errno set. */
static int
list_names(int fd, struct xattrs *x, ssize_t *len)
{
    for (int attempt = 0; attempt < ATTEMPTS; attempt++) {
        ssize_t want = flistxattr(fd, NULL, 0);
        if (want < 0)
            return -1;
        if (want == 0) { /* none (never ask with a buffer of size 0: that is a query) */
            *len = 0;
            return 0;
        }
        char *list = malloc((size_t)want);
        if (list == NULL) {
            errno = ENOMEM;
            return -1;
        }
        ssize_t got = flistxattr(fd, list, (size_t)want);
        if (got >= 0 && got <= want) {
            x->list = list;
            *len = got;
            return 0;
        }
        int saved = errno;
        free(list);
        if (got >= 0 || saved != ERANGE) { /* more than it was given: never trusted */
            errno = got >= 0 ? EIO : saved;
            return -1;
        }
    }
    errno = EAGAIN; /* kept growing */
    return -1;
}

/* One value into x->values[i]; 0 (NULL when it was removed), or -1 with errno set. */
static int
read_value(int fd, struct xattrs *x, size_t i)
{
    for (int attempt = 0; attempt < ATTEMPTS; attempt++) {
        ssize_t want = fgetxattr(fd, x->names[i], NULL, 0);
        if (want < 0)
            return errno == ENODATA ? 0 : -1; /* ENODATA: removed since it was listed */
        char *value = malloc(want > 0 ? (size_t)want : 1);
        if (value == NULL) {
            errno = ENOMEM;
            return -1;
        }
        ssize_t got = want > 0 ? fgetxattr(fd, x->names[i], value, (size_t)want) : 0;
        if (got >= 0 && got <= want) {
            x->values[i] = value;
            x->lengths[i] = got;
            return 0;
        }
        int saved = errno;
        free(value);
        if (got < 0 && saved == ENODATA)
            return 0;
        if (got >= 0 || saved != ERANGE) {
            errno = got >= 0 ? EIO : saved;
            return -1;
        }
    }
    errno = EAGAIN;
    return -1;
}

/* Every xattr of fd into x (none where the file system has none); 0, or -1 with errno set. */
static int
read_xattrs(int fd, struct xattrs *x)
{
    ssize_t len;
    if (list_names(fd, x, &len) < 0)
        return errno == ENOTSUP || errno == ENODATA ? 0 : -1;
    if (len == 0)
        return 0;
    if (x->list[len - 1] != '\0') {
        errno = EIO;
        return -1;
    }
    size_t count = 0;
    for (ssize_t i = 0; i < len; i++)
        count += x->list[i] == '\0';
    x->names = malloc(count * sizeof *x->names);
    x->values = calloc(count, sizeof *x->values);
    x->lengths = calloc(count, sizeof *x->lengths);
    if (x->names == NULL || x->values == NULL || x->lengths == NULL) {
        errno = ENOMEM;
        return -1;
    }
    for (ssize_t i = 0; i < len; i += (ssize_t)strlen(x->list + i) + 1)
        x->names[x->count++] = x->list + i;
    qsort(x->names, x->count, sizeof *x->names, by_bytes);
    for (size_t i = 0; i < x->count; i++)
        if (read_value(fd, x, i) < 0)
            return -1;
    return 0;
}

/* The tuple of (name, value) pairs of x, names decoded as os.listxattr decodes them. */
static PyObject *
xattrs_tuple(const struct xattrs *x)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < x->count; i++) {
        if (x->values[i] == NULL)
            continue;
        PyObject *name = PyUnicode_DecodeFSDefault(x->names[i]);
        PyObject *value = PyBytes_FromStringAndSize(x->values[i], x->lengths[i]);
        PyObject *pair = name != NULL && value != NULL ? PyTuple_Pack(2, name, value) : NULL;
        Py_XDECREF(name);
        Py_XDECREF(value);
        if (pair == NULL || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(pair);
    }
    PyObject *tuple = PyList_AsTuple(out);
    Py_DECREF(out);
    return tuple;
}

/* --- read_open ---------------------------------------------------------------------------- */

/* An int argument as a long long; 1 when it does not fit (no error set), -1 on an error. */
static int
as_long_long(PyObject *obj, long long *out)
{
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    return overflow != 0;
}

static int
as_unsigned(PyObject *obj, unsigned long long *out)
{
    *out = PyLong_AsUnsignedLongLong(obj);
    if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 1;
    }
    return 0;
}

/* Whether the time t is ns nanoseconds after the epoch (no overflow for any of either). */
static int
same_time(struct timespec t, long long ns)
{
    long long sec = ns / NS, nsec = ns % NS;
    if (nsec < 0) { /* before 1970: floor, as st_mtime_ns is */
        nsec += NS;
        sec -= 1;
    }
    return (long long)t.tv_sec == sec && (long long)t.tv_nsec == nsec;
}

static PyObject *
read_open(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd;
    PyObject *size_o, *ino_o, *dev_o, *mtime_o, *ctime_o;
    if (!PyArg_ParseTuple(args, "iOOOOO", &fd, &size_o, &ino_o, &dev_o, &mtime_o, &ctime_o))
        return NULL; /* the caller's bug: fd is left to it */
    long long size, mtime_ns, ctime_ns;
    unsigned long long ino, dev;
    int r; /* -1: an error; 1: a value no look of a file has (past 64 bits, a negative size) */
    if ((r = as_long_long(size_o, &size)) == 0 && (r = as_unsigned(ino_o, &ino)) == 0 &&
        (r = as_unsigned(dev_o, &dev)) == 0 && (r = as_long_long(mtime_o, &mtime_ns)) == 0 &&
        (r = as_long_long(ctime_o, &ctime_ns)) == 0 && size < 0)
        r = 1;
    unsigned char *chunk = r == 0 ? thread_chunk() : NULL;
    if (r == 0 && chunk == NULL)
        r = -1;
    if (r != 0) {
        Py_BEGIN_ALLOW_THREADS
        close(fd);
        Py_END_ALLOW_THREADS
        if (r > 0)
            Py_RETURN_NONE; /* measured the careful way */
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    SHA256_CTX ctx;
    long long count = 0;
    int ok = 1;
    struct stat after;
    struct xattrs x = {0};
    int listed = 0;
    Py_BEGIN_ALLOW_THREADS
    SHA256_Init(&ctx);
    /* never more than one byte past the size lstat gave: that byte says it grew */
    while (count <= size) {
        long long left = size + 1 - count;
        size_t want = left < CHUNK_BYTES ? (size_t)left : CHUNK_BYTES;
        ssize_t got = read(fd, chunk, want);
        if (got < 0) {
            ok = 0;
            break;
        }
        if (got == 0)
            break;
        SHA256_Update(&ctx, chunk, (size_t)got);
        count += got;
        if (size <= INLINE_BYTES)
            break; /* a small file is read in one call, as the Python code reads it */
    }
    ok = ok && fstat(fd, &after) == 0 && count == size && S_ISREG(after.st_mode) &&
         (unsigned long long)after.st_ino == ino && (unsigned long long)after.st_dev == dev &&
         (long long)after.st_size == size && same_time(after.st_mtim, mtime_ns) &&
         same_time(after.st_ctim, ctime_ns);
    if (ok)
        listed = read_xattrs(fd, &x) == 0;
    close(fd);
    Py_END_ALLOW_THREADS
    if (!ok || !listed) {
        xattrs_free(&x);
        Py_RETURN_NONE; /* not that look's file, or an error: measured again, carefully */
    }
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256_Final(digest, &ctx);
    PyObject *xattrs = xattrs_tuple(&x);
    xattrs_free(&x);
    if (xattrs == NULL)
        return NULL;
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
    pthread_once(&chunk_once, make_chunk_key);
    if (chunk_key_error != 0) {
        errno = chunk_key_error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyModule_Create(&module);
}
