/*
 * _mailrelay_scan: the two passes the DATA reader makes over every message, at memchr speed.
 *
 * Both do exactly what the pure-Python versions in mailrelay/smtp/data.py do (the tests compare
 * them on generated input); they exist because CPython's bytes.count and bytes.find with a
 * multi-byte needle scan text with a CRLF every few dozen octets at 1-3 GB/s, which for a
 * 100 KiB message is a large part of the whole intake path.
 *
 * Installed as a top-level module so that it is found whether mailrelay is imported from the
 * installed package or from a source tree.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Scans of this many octets or more let other threads run meanwhile (the store's writer thread
 * waits for the GIL while the reactor thread reads a large message); the buffer is held by its
 * Py_buffer export throughout, so it cannot change or go away. */
#define RELEASE_GIL_FROM (32 * 1024)

/* find_dot_line(text, start) -> int: the index of the first b"\r\n." at or after start, or -1:
 * text.find(b"\r\n.", start) for 0 <= start. */
static PyObject *
find_dot_line(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "y*n:find_dot_line", &view, &start)) {
        return NULL;
    }
    const char *text = view.buf;
    const char *end = text + view.len;
    Py_ssize_t found = -1;
    if (start < 0) {
        start = 0;
    }
    PyThreadState *released = view.len >= RELEASE_GIL_FROM ? PyEval_SaveThread() : NULL;
    if (start < view.len) {
        /* An LF that can close a match sits at start + 1 or later, with an octet after it. */
        const char *from = text + start + 1;
        while (from < end) {
            const char *lf = memchr(from, '\n', (size_t)(end - from));
            if (lf == NULL || lf + 1 >= end) {
                break;
            }
            if (lf[-1] == '\r' && lf[1] == '.') {
                found = (lf - 1) - text;
                break;
            }
            from = lf + 1;
        }
    }
    if (released != NULL) {
        PyEval_RestoreThread(released);
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(found);
}

/* line_problem(text, max_line) -> int: 0 when every CR and LF in text is part of a CRLF and no
 * line (CRLF excluded; the text after the last CRLF counts as a line) is longer than max_line;
 * 1 for a bare CR or LF (whatever the line lengths); else 2, for a line that is too long. */
static PyObject *
line_problem(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t maxLine;
    if (!PyArg_ParseTuple(args, "y*n:line_problem", &view, &maxLine)) {
        return NULL;
    }
    const char *line = view.buf;
    const char *end = line + view.len;
    int problem = 0;
    PyThreadState *released = view.len >= RELEASE_GIL_FROM ? PyEval_SaveThread() : NULL;
    for (;;) {
        const char *lf = memchr(line, '\n', (size_t)(end - line));
        /* The line's content ends at its CR; the last line (no LF) runs to the end. */
        const char *contentEnd = lf == NULL ? end : lf - 1;
        if (lf != NULL && (lf == view.buf || lf[-1] != '\r')) {
            problem = 1;
            break;
        }
        if (contentEnd > line && memchr(line, '\r', (size_t)(contentEnd - line)) != NULL) {
            problem = 1;
            break;
        }
        if (contentEnd - line > maxLine) {
            problem = 2; /* a bare line ending later on still wins: keep looking */
        }
        if (lf == NULL) {
            break;
        }
        line = lf + 1;
    }
    if (released != NULL) {
        PyEval_RestoreThread(released);
    }
    PyBuffer_Release(&view);
    return PyLong_FromLong(problem);
}

static PyMethodDef methods[] = {
    {"find_dot_line", find_dot_line, METH_VARARGS,
     "find_dot_line(text, start) -> int: text.find(b'\\r\\n.', start)"},
    {"line_problem", line_problem, METH_VARARGS,
     "line_problem(text, max_line) -> int: 0 fine, 1 bare CR or LF, 2 a line too long"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scanModule = {
    PyModuleDef_HEAD_INIT, "_mailrelay_scan",
    "Native scans of SMTP DATA text (see mailrelay/smtp/data.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__mailrelay_scan(void)
{
    return PyModule_Create(&scanModule);
}
