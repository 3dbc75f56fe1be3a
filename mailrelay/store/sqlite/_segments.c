/*
 * _mailrelay_segments: the SQLite store's writer copies each large body into its O_DIRECT
 * buffer and takes its CRC-32C in the same call, with the GIL released.
 *
 * google-crc32c (the reference: the tests compare the two on generated input) takes only
 * bytes, not a view of part of one, and holds the GIL for anything under 1 MiB; a slice
 * assignment into the buffer holds it too. For a 100 KiB body the two were ~10 % of the time
 * the relay's threads held the GIL, which is what its rate is bound by: the reactor thread
 * waited while the writer copied.
 *
 * Only where the CPU has a CRC-32C instruction (x86-64 with SSE 4.2); elsewhere the module has
 * no copy_crc32c and the writer keeps to google-crc32c and a slice assignment.
 *
 * Installed as a top-level module, as _mailrelay_scan is.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Copies this large or larger let the reactor thread run meanwhile. */
#define RELEASE_GIL_FROM (16 * 1024)

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
/* copy_crc32c(destination, offset, source, crc) -> int: copies source into
 * destination[offset:offset + len(source)] and returns the CRC-32C of source continued from
 * crc (0 to start): google_crc32c.extend(crc, bytes(source)). */
static PyObject *
copy_crc32c(PyObject *module, PyObject *args)
{
    Py_buffer destination, source;
    Py_ssize_t offset;
    unsigned long crc;
    if (!PyArg_ParseTuple(args, "w*ny*k:copy_crc32c", &destination, &offset, &source, &crc)) {
        return NULL;
    }
    if (offset < 0 || offset > destination.len || source.len > destination.len - offset) {
        PyBuffer_Release(&source);
        PyBuffer_Release(&destination);
        PyErr_SetString(PyExc_ValueError, "copy_crc32c: source does not fit at offset");
        return NULL;
    }
    /* Both buffers stay exported until released below, so neither can move or go away. */
    PyThreadState *released = source.len >= RELEASE_GIL_FROM ? PyEval_SaveThread() : NULL;
    unsigned char *target = (unsigned char *)destination.buf + offset;
    memcpy(target, source.buf, (size_t)source.len);
    uint32_t result = crc32cExtend((uint32_t)crc, target, (size_t)source.len);
    if (released != NULL) {
        PyEval_RestoreThread(released);
    }
    PyBuffer_Release(&source);
    PyBuffer_Release(&destination);
    return PyLong_FromUnsignedLong(result);
}
#endif

static PyMethodDef methods[] = {
#if HAVE_HARDWARE_CRC
    {"copy_crc32c", copy_crc32c, METH_VARARGS,
     "copy_crc32c(destination, offset, source, crc) -> int: copy source into destination at "
     "offset; its CRC-32C continued from crc"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef segmentsModule = {
    PyModuleDef_HEAD_INIT, "_mailrelay_segments",
    "Native copy and CRC-32C of message bodies (see mailrelay/store/sqlite/bodies.py).", -1,
    methods,
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
    if (!__builtin_cpu_supports("sse4.2") && PyObject_DelAttrString(module, "copy_crc32c") < 0) {
        Py_DECREF(module);
        return NULL;
    }
#endif
    return module;
}
