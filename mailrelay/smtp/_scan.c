/*
 * _mailrelay_scan: the two passes the DATA reader makes over every message, at memchr speed,
 * and the split of a header block into its fields.
 *
 * Each does exactly what its pure-Python version does (find_dot_line and line_problem in
 * mailrelay/smtp/data.py, header_fields in mailrelay/headerblock.py; the tests compare them on
 * generated input). The scans exist because CPython's bytes.count and bytes.find with a
 * multi-byte needle scan text with a CRLF every few dozen octets at 1-3 GB/s, which for a
 * 100 KiB message is a large part of the whole intake path; the header split because every
 * message's header is read field by field on the way in and again on the way out, and a
 * regular expression a line costs more than the rest of the content rules' reading.
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

/* Whether c may be in a field name: RFC 5322's printable US-ASCII but the colon. */
static inline int
isNameOctet(unsigned char c)
{
    return c >= '!' && c <= '~' && c != ':';
}

/* The field name at the start of [line, end) lower-cased, when the line is "name [blanks]:";
 * else an empty str. */
static PyObject *
fieldName(const unsigned char *line, const unsigned char *end)
{
    const unsigned char *p = line;
    while (p < end && isNameOctet(*p)) {
        p++;
    }
    const unsigned char *nameEnd = p;
    while (p < end && (*p == ' ' || *p == '\t')) {
        p++;
    }
    if (nameEnd == line || p >= end || *p != ':') {
        return PyUnicode_New(0, 127);
    }
    Py_ssize_t length = nameEnd - line;
    PyObject *name = PyUnicode_New(length, 127);
    if (name == NULL) {
        return NULL;
    }
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(name);
    for (Py_ssize_t i = 0; i < length; i++) {
        unsigned char c = line[i];
        out[i] = (c >= 'A' && c <= 'Z') ? (Py_UCS1)(c + ('a' - 'A')) : c;
    }
    return name;
}

/* Append field_type((name, start, end)) to fields; takes the reference to name, also when it
 * fails (as Py_BuildValue's "N" does). The tuple
 * subclass is made by tuple's own constructor, as tuple.__new__(field_type, ...) makes it. */
static int
appendField(PyObject *fields, PyTypeObject *fieldType, PyObject *name, Py_ssize_t start,
            Py_ssize_t end)
{
    PyObject *values = Py_BuildValue("(Nnn)", name, start, end);
    if (values == NULL) {
        return -1;
    }
    PyObject *args = PyTuple_Pack(1, values);
    Py_DECREF(values);
    if (args == NULL) {
        return -1;
    }
    PyObject *field = PyTuple_Type.tp_new(fieldType, args, NULL);
    Py_DECREF(args);
    if (field == NULL) {
        return -1;
    }
    int failed = PyList_Append(fields, field);
    Py_DECREF(field);
    return failed;
}

/* header_fields(block, field_type) -> list: the fields of a header block, as
 * mailrelay.headerblock.pyHeaderFields reads them (see there), each made a field_type (a tuple
 * subclass of name, start, end). Lines are split at CRLF only; a bare CR or LF is part of its
 * line. */
static PyObject *
header_fields(PyObject *module, PyObject *args)
{
    Py_buffer view;
    PyTypeObject *fieldType;
    if (!PyArg_ParseTuple(args, "y*O!:header_fields", &view, &PyType_Type, &fieldType)) {
        return NULL;
    }
    if (!PyType_IsSubtype(fieldType, &PyTuple_Type)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "header_fields: field_type must be a tuple subclass");
        return NULL;
    }
    PyObject *fields = PyList_New(0);
    if (fields == NULL || view.len == 0) {
        PyBuffer_Release(&view);
        return fields;
    }
    const unsigned char *text = view.buf;
    const unsigned char *end = text + view.len;
    const unsigned char *line = text;
    PyObject *name = NULL; /* the open field's, NULL before the first line */
    Py_ssize_t start = 0;
    for (;;) {
        /* This line's CRLF: the first LF after a CR at or after the line's start. */
        const unsigned char *lineEnd = NULL, *from = line;
        while (from < end) {
            const unsigned char *lf = memchr(from, '\n', (size_t)(end - from));
            if (lf == NULL) {
                break;
            }
            if (lf > line && lf[-1] == '\r') {
                lineEnd = lf - 1;
                break;
            }
            from = lf + 1;
        }
        const unsigned char *next = lineEnd == NULL ? end : lineEnd + 2;
        const unsigned char *contentEnd = lineEnd == NULL ? end : lineEnd;
        int continuation = name != NULL && line < contentEnd && (*line == ' ' || *line == '\t');
        if (!continuation) {
            if (name != NULL) {
                int appended = appendField(fields, fieldType, name, start, line - text);
                name = NULL; /* the field has it, or it is gone */
                if (appended < 0) {
                    goto failed;
                }
            }
            name = fieldName(line, contentEnd);
            if (name == NULL) {
                goto failed;
            }
            start = line - text;
        }
        /* The text after the last CRLF is a line of its own, unless it is empty. */
        if (next >= end) {
            break;
        }
        line = next;
    }
    if (appendField(fields, fieldType, name, start, view.len) < 0) {
        name = NULL; /* the failed append let it go */
        goto failed;
    }
    PyBuffer_Release(&view);
    return fields;

failed:
    Py_XDECREF(name);
    Py_DECREF(fields);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"find_dot_line", find_dot_line, METH_VARARGS,
     "find_dot_line(text, start) -> int: text.find(b'\\r\\n.', start)"},
    {"line_problem", line_problem, METH_VARARGS,
     "line_problem(text, max_line) -> int: 0 fine, 1 bare CR or LF, 2 a line too long"},
    {"header_fields", header_fields, METH_VARARGS,
     "header_fields(block, field_type) -> list: a header block's fields, as field_type tuples"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scanModule = {
    PyModuleDef_HEAD_INIT, "_mailrelay_scan",
    "Native scans of SMTP DATA text and header blocks (see mailrelay/smtp/data.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__mailrelay_scan(void)
{
    return PyModule_Create(&scanModule);
}
