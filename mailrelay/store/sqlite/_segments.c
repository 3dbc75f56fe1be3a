/*
 * _mailrelay_segments: the SQLite store's writer copies a commit group's large bodies into its
 * O_DIRECT buffer, takes each one's CRC-32C and writes the buffer out, all in one call with
 * the GIL released once.
 *
 * google-crc32c (the reference: the tests compare the two on generated input) takes only
 * bytes, not a view of part of one, and holds the GIL for anything under 1 MiB; a slice
 * assignment into the buffer holds it too. For a 100 KiB body the two were ~10 % of the time
 * the relay's threads held the GIL, which both of them need; and each time the writer lets go
 * of the GIL (for a copy, for the write) it must then wait for the reactor thread to hand it
 * back.
 *
 * Only where the CPU has a CRC-32C instruction (x86-64 with SSE 4.2); elsewhere the module has
 * no write_group and the writer keeps to google-crc32c, a slice assignment and os.pwritev.
 *
 * Installed as a top-level module, as _mailrelay_scan is.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_HARDWARE_CRC 1
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static uint32_t
crc32cExtend(uint32_t crc, const unsigned char *data, size_t length)
{
    uint64_t state = ~crc;
    while (length && ((uintptr_t)data & 7)) {
        state = _mm_crc32_u8((uint32_t)state, *data++);
        length--;
    }
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, data, 8);
        state = _mm_crc32_u64(state, word);
        data += 8;
        length -= 8;
    }
    while (length--) {
        state = _mm_crc32_u8((uint32_t)state, *data++);
    }
    return ~(uint32_t)state;
}
#else
#define HAVE_HARDWARE_CRC 0
#endif

#if HAVE_HARDWARE_CRC
/* Writes buffer[0:length] at position, all of it or an error (errno set): -1. */
static int
writeAll(int fd, const unsigned char *buffer, size_t length, off_t position)
{
    size_t done = 0;
    while (done < length) {
        ssize_t count = pwrite(fd, buffer + done, length - done, position + (off_t)done);
        if (count < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (count == 0) {
            errno = EIO;
            return -1;
        }
        done += (size_t)count;
    }
    return 0;
}

/* write_group(fd, buffer, position, alignment, bodies) -> (crcs, end): copies each body (a
 * sequence of buffers, its pieces) into buffer one after another, taking each body's CRC-32C,
 * and writes buffer to fd at position each time it is full and once more at the end, that last
 * write padded to a multiple of alignment; returns the CRC-32C of each body and where the
 * written bytes end. One call for a whole commit group, which lets go of the GIL once: the
 * writer thread then waits once, not once per body, for the reactor thread to hand it back. */
static PyObject *
write_group(PyObject *module, PyObject *args)
{
    int fd;
    Py_buffer buffer;
    long long position;
    Py_ssize_t alignment;
    PyObject *bodies;
    if (!PyArg_ParseTuple(args, "iw*LnO:write_group", &fd, &buffer, &position, &alignment,
                          &bodies)) {
        return NULL;
    }
    PyObject *result = NULL, *crcList = NULL, *bodyList = NULL;
    Py_buffer *pieces = NULL;
    Py_ssize_t *pieceCounts = NULL, pieceTotal = 0, bodyCount = 0, held = 0;
    uint32_t *crcs = NULL;
    if (alignment <= 0 || buffer.len < alignment || buffer.len % alignment != 0) {
        PyErr_SetString(PyExc_ValueError, "write_group: the buffer must be whole alignments");
        goto done;
    }
    bodyList = PySequence_Fast(bodies, "write_group: bodies must be a sequence");
    if (bodyList == NULL) {
        goto done;
    }
    bodyCount = PySequence_Fast_GET_SIZE(bodyList);
    pieceCounts = PyMem_Calloc((size_t)bodyCount + 1, sizeof(Py_ssize_t));
    crcs = PyMem_Calloc((size_t)bodyCount + 1, sizeof(uint32_t));
    if (pieceCounts == NULL || crcs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < bodyCount; i++) {
        Py_ssize_t count = PyObject_Length(PySequence_Fast_GET_ITEM(bodyList, i));
        if (count < 0) {
            goto done;
        }
        pieceCounts[i] = count;
        pieceTotal += count;
    }
    pieces = PyMem_Calloc((size_t)pieceTotal + 1, sizeof(Py_buffer));
    if (pieces == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < bodyCount; i++) {
        PyObject *body = PySequence_Fast_GET_ITEM(bodyList, i);
        for (Py_ssize_t j = 0; j < pieceCounts[i]; j++) {
            PyObject *piece = PySequence_GetItem(body, j);
            if (piece == NULL) {
                goto done;
            }
            int failed = PyObject_GetBuffer(piece, &pieces[held], PyBUF_SIMPLE);
            Py_DECREF(piece);
            if (failed) {
                goto done;
            }
            held++;
        }
    }

    /* Every piece is exported (it cannot move or go away) until released below. */
    unsigned char *target = buffer.buf;
    size_t capacity = (size_t)buffer.len, filled = 0;
    off_t start = (off_t)position;
    int failedErrno = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t next = 0;
    for (Py_ssize_t i = 0; i < bodyCount && !failedErrno; i++) {
        uint32_t crc = 0;
        for (Py_ssize_t j = 0; j < pieceCounts[i] && !failedErrno; j++, next++) {
            const unsigned char *data = pieces[next].buf;
            size_t length = (size_t)pieces[next].len;
            while (length) {
                size_t count = capacity - filled < length ? capacity - filled : length;
                memcpy(target + filled, data, count);
                crc = crc32cExtend(crc, target + filled, count);
                filled += count;
                data += count;
                length -= count;
                if (filled == capacity) {
                    if (writeAll(fd, target, filled, start) < 0) {
                        failedErrno = errno;
                        break;
                    }
                    start += (off_t)filled;
                    filled = 0;
                }
            }
        }
        crcs[i] = crc;
    }
    if (!failedErrno && filled) {
        size_t padded = (filled + (size_t)alignment - 1) / (size_t)alignment * (size_t)alignment;
        memset(target + filled, 0, padded - filled);
        if (writeAll(fd, target, padded, start) < 0) {
            failedErrno = errno;
        } else {
            start += (off_t)padded;
        }
    }
    Py_END_ALLOW_THREADS
    if (failedErrno) {
        errno = failedErrno;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    crcList = PyList_New(bodyCount);
    if (crcList == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < bodyCount; i++) {
        PyObject *value = PyLong_FromUnsignedLong(crcs[i]);
        if (value == NULL) {
            goto done;
        }
        PyList_SET_ITEM(crcList, i, value);
    }
    result = Py_BuildValue("(OL)", crcList, (long long)start);
done:
    for (Py_ssize_t k = 0; k < held; k++) {
        PyBuffer_Release(&pieces[k]);
    }
    PyMem_Free(pieces);
    PyMem_Free(pieceCounts);
    PyMem_Free(crcs);
    Py_XDECREF(crcList);
    Py_XDECREF(bodyList);
    PyBuffer_Release(&buffer);
    return result;
}
#endif

static PyMethodDef methods[] = {
#if HAVE_HARDWARE_CRC
    {"write_group", write_group, METH_VARARGS,
     "write_group(fd, buffer, position, alignment, bodies) -> (crcs, end): copy, checksum "
     "and write a commit group's bodies"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef segmentsModule = {
    PyModuleDef_HEAD_INIT, "_mailrelay_segments",
    "Native copy, CRC-32C and write of a commit group's bodies "
    "(see mailrelay/store/sqlite/bodies.py).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__mailrelay_segments(void)
{
    PyObject *module = PyModule_Create(&segmentsModule);
    if (module == NULL) {
        return NULL;
    }
#if HAVE_HARDWARE_CRC
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("sse4.2") &&
        PyObject_DelAttrString(module, "write_group") < 0) {
        Py_DECREF(module);
        return NULL;
    }
#endif
    return module;
}
