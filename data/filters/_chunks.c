/* A document's per-chunk caches, read in C (data/filters/text.py `word_counts`, tokens.py `spaced_words`).
 *
 * A document's words (datatrove `split_into_words`, spaCy's English tokens) are its whitespace-separated
 * chunks' tokens in order (spaCy tokenizes each chunk alone), so what the filters need of the words is
 * kept per chunk, computed once from the chunk's tokens, and combined per document here: a known chunk
 * costs one dict lookup. In Python, the per-document loop over chunks and the per-word checks were most of
 * the Gopher filters' time.
 * - count: GopherQuality's counts, summed: words, words with a character outside PUNCTUATION_SET
 *   ("non-symbol"), their total length, words with a letter, and which stop words occur (a bit mask,
 *   OR-ed); a chunk's counts are 20 bytes in a dict.
 * - line_marks: GopherQuality's line counts (lines, lines starting with a bullet, lines ending in an
 *   ellipsis), as str.splitlines, lstrip and rstrip read them.
 * - spaced: the words joined by single spaces (what GopherRepetition hashes); a chunk of letters that is
 *   no special case is its own token and needs no lookup.
 * Chunks are split as str.split() does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint32_t words, non_symbol, non_symbol_chars, alpha, stop_mask;
} ChunkCounts;

static Py_UCS4 *punct = NULL; /* PUNCTUATION_SET, sorted */
static Py_ssize_t n_punct = 0;
static unsigned char punct_ascii[128];
static PyObject *stop_bits = NULL; /* dict: stop word -> its bit */

static int is_punct(Py_UCS4 ch) {
    if (ch < 128) return punct_ascii[ch];
    Py_ssize_t lo = 0, hi = n_punct;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (punct[mid] < ch) lo = mid + 1;
        else hi = mid;
    }
    return lo < n_punct && punct[lo] == ch;
}

static int cmp_ucs4(const void *a, const void *b) {
    Py_UCS4 x = *(const Py_UCS4 *)a, y = *(const Py_UCS4 *)b;
    return (x > y) - (x < y);
}

/* setup(punctuation: str, stop_words: tuple[str, ...]): the characters that make a word a symbol and
 * the stop words (at most 32), once per process. */
static PyObject *setup(PyObject *self, PyObject *args) {
    PyObject *chars, *words;
    if (!PyArg_ParseTuple(args, "UO!", &chars, &PyTuple_Type, &words)) return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(chars), nw = PyTuple_GET_SIZE(words);
    if (nw > 32) {
        PyErr_Format(PyExc_ValueError, "at most 32 stop words, got %zd", nw);
        return NULL;
    }
    Py_UCS4 *buf = PyUnicode_AsUCS4Copy(chars);
    if (!buf) return NULL;
    qsort(buf, (size_t)n, sizeof(Py_UCS4), cmp_ucs4);
    PyObject *bits = PyDict_New();
    if (!bits) {
        PyMem_Free(buf);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nw; i++) {
        PyObject *bit = PyLong_FromUnsignedLong(1UL << i);
        if (!bit || PyDict_SetItem(bits, PyTuple_GET_ITEM(words, i), bit) < 0) {
            Py_XDECREF(bit);
            Py_DECREF(bits);
            PyMem_Free(buf);
            return NULL;
        }
        Py_DECREF(bit);
    }
    PyMem_Free(punct);
    punct = buf;
    n_punct = n;
    memset(punct_ascii, 0, sizeof punct_ascii);
    for (Py_ssize_t i = 0; i < n; i++)
        if (buf[i] < 128) punct_ascii[buf[i]] = 1;
    Py_XSETREF(stop_bits, bits);
    Py_RETURN_NONE;
}

/* The start of the next whitespace-free chunk at or after *i (its end is left in *i), or -1. */
static Py_ssize_t next_chunk(int kind, const void *data, Py_ssize_t n, Py_ssize_t *i) {
    Py_ssize_t k = *i;
    while (k < n && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, k))) k++;
    if (k >= n) return -1;
    Py_ssize_t start = k;
    while (k < n && !Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, k))) k++;
    *i = k;
    return start;
}

/* Add one word to a chunk's counts. */
static int add_word(PyObject *word, ChunkCounts *out) {
    Py_ssize_t len = PyUnicode_GET_LENGTH(word);
    int kind = PyUnicode_KIND(word);
    const void *data = PyUnicode_DATA(word);
    int non_symbol = 0, alpha = 0;
    for (Py_ssize_t i = 0; i < len && !(non_symbol && alpha); i++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        if (!non_symbol && !is_punct(ch)) non_symbol = 1;
        if (!alpha && Py_UNICODE_ISALPHA(ch)) alpha = 1;
    }
    out->words += 1;
    out->non_symbol += non_symbol;
    out->non_symbol_chars += non_symbol ? (uint32_t)len : 0;
    out->alpha += alpha;
    PyObject *bit = PyDict_GetItemWithError(stop_bits, word);
    if (bit) out->stop_mask |= (uint32_t)PyLong_AsUnsignedLong(bit);
    else if (PyErr_Occurred()) return -1;
    return 0;
}

static int is_letters(PyObject *chunk) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(chunk);
    int kind = PyUnicode_KIND(chunk);
    const void *data = PyUnicode_DATA(chunk);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!Py_UNICODE_ISALPHA(PyUnicode_READ(kind, data, i))) return 0;
    return n > 0;
}

/* Whether a chunk is its own and only token without asking the tokenizer: letters only and no special
 * case (`special`: spaCy's special-case strings, or None where the patterns can split letters). */
static int whole_word(PyObject *chunk, PyObject *special) {
    if (special == Py_None || !is_letters(chunk)) return 0;
    int in = PySet_Contains(special, chunk);
    return in < 0 ? -1 : !in;
}

/* The counts of one chunk from its tokens (a tuple of str). */
static int chunk_counts(PyObject *tokens, ChunkCounts *out) {
    if (!PyTuple_Check(tokens)) {
        PyErr_SetString(PyExc_TypeError, "tokenize must return a tuple of str per chunk");
        return -1;
    }
    memset(out, 0, sizeof *out);
    for (Py_ssize_t t = 0; t < PyTuple_GET_SIZE(tokens); t++) {
        PyObject *word = PyTuple_GET_ITEM(tokens, t);
        if (!PyUnicode_Check(word)) {
            PyErr_SetString(PyExc_TypeError, "tokenize must return a tuple of str per chunk");
            return -1;
        }
        if (add_word(word, out) < 0) return -1;
    }
    return 0;
}

static void add(uint64_t sum[4], uint32_t *mask, const ChunkCounts *c) {
    sum[0] += c->words;
    sum[1] += c->non_symbol;
    sum[2] += c->non_symbol_chars;
    sum[3] += c->alpha;
    *mask |= c->stop_mask;
}

/* count(text, cache, special, tokenize, limit) -> (words, non_symbol, non_symbol_chars, alpha, stop words
 * seen). cache: dict chunk -> counts (bytes), filled here; a new chunk of letters that is not in `special`
 * (a set; None: no such shortcut) is one word; tokenize(list of chunks) -> their token tuples is called
 * once per document with the other chunks not in the cache; the cache is emptied first when it would
 * reach `limit` entries. */
static PyObject *count(PyObject *self, PyObject *args) {
    PyObject *text, *cache, *special, *tokenize;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "UO!OOn", &text, &PyDict_Type, &cache, &special, &tokenize, &limit))
        return NULL;
    if (special != Py_None && !PyAnySet_Check(special)) {
        PyErr_SetString(PyExc_TypeError, "special must be a set or None");
        return NULL;
    }
    if (!stop_bits) {
        PyErr_SetString(PyExc_RuntimeError, "_chunks.setup() was not called");
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    uint64_t sum[4] = {0, 0, 0, 0};
    uint32_t mask = 0;
    PyObject *missing = NULL; /* chunks not cached, in order, repeats included */
    PyObject *result = NULL;
    Py_ssize_t i = 0, start;
    while ((start = next_chunk(kind, data, n, &i)) >= 0) {
        PyObject *chunk = PyUnicode_Substring(text, start, i);
        if (!chunk) goto done;
        PyObject *value = PyDict_GetItemWithError(cache, chunk);
        if (value) {
            add(sum, &mask, (const ChunkCounts *)PyBytes_AS_STRING(value));
            Py_DECREF(chunk);
            continue;
        }
        int whole = PyErr_Occurred() ? -1 : whole_word(chunk, special);
        if (whole > 0) { /* one word: counted here, no tokens needed */
            ChunkCounts c;
            memset(&c, 0, sizeof c);
            if (add_word(chunk, &c) < 0) whole = -1;
            PyObject *v = whole < 0 ? NULL : PyBytes_FromStringAndSize((const char *)&c, sizeof c);
            if (v && PyDict_GET_SIZE(cache) + 1 >= limit) PyDict_Clear(cache);
            if (!v || PyDict_SetItem(cache, chunk, v) < 0) whole = -1;
            Py_XDECREF(v);
            if (whole > 0) add(sum, &mask, &c);
        }
        if (whole < 0 || (!whole && !missing && !(missing = PyList_New(0)))) {
            Py_DECREF(chunk);
            goto done;
        }
        if (whole) {
            Py_DECREF(chunk);
            continue;
        }
        int rc = PyList_Append(missing, chunk);
        Py_DECREF(chunk);
        if (rc < 0) goto done;
    }
    if (missing) {
        /* Each distinct new chunk tokenized and counted once. */
        PyObject *fresh = PyDict_New(), *distinct = NULL, *tokens = NULL;
        if (!fresh) goto done;
        Py_ssize_t nm = PyList_GET_SIZE(missing);
        for (Py_ssize_t k = 0; k < nm; k++)
            if (PyDict_SetItem(fresh, PyList_GET_ITEM(missing, k), Py_None) < 0) goto fail;
        distinct = PySequence_List(fresh);
        if (!distinct) goto fail;
        tokens = PyObject_CallOneArg(tokenize, distinct);
        if (!tokens) goto fail;
        if (!PyList_Check(tokens) || PyList_GET_SIZE(tokens) != PyList_GET_SIZE(distinct)) {
            PyErr_SetString(PyExc_TypeError, "tokenize must return a list with one tuple per chunk");
            goto fail;
        }
        if (PyDict_GET_SIZE(cache) + PyList_GET_SIZE(distinct) >= limit) PyDict_Clear(cache);
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(distinct); k++) {
            ChunkCounts c;
            if (chunk_counts(PyList_GET_ITEM(tokens, k), &c) < 0) goto fail;
            PyObject *value = PyBytes_FromStringAndSize((const char *)&c, sizeof c);
            if (!value) goto fail;
            PyObject *chunk = PyList_GET_ITEM(distinct, k);
            int rc = PyDict_SetItem(cache, chunk, value) < 0 || PyDict_SetItem(fresh, chunk, value) < 0;
            Py_DECREF(value);
            if (rc) goto fail;
        }
        for (Py_ssize_t k = 0; k < nm; k++) {
            PyObject *value = PyDict_GetItemWithError(fresh, PyList_GET_ITEM(missing, k));
            if (!value) goto fail;
            add(sum, &mask, (const ChunkCounts *)PyBytes_AS_STRING(value));
        }
        Py_DECREF(fresh);
        Py_DECREF(distinct);
        Py_DECREF(tokens);
        goto counted;
    fail:
        Py_DECREF(fresh);
        Py_XDECREF(distinct);
        Py_XDECREF(tokens);
        goto done;
    }
counted:
    result = Py_BuildValue("(KKKKi)", (unsigned long long)sum[0], (unsigned long long)sum[1],
                           (unsigned long long)sum[2], (unsigned long long)sum[3], __builtin_popcount(mask));
done:
    Py_XDECREF(missing);
    return result;
}

/* spaced(text, cache, special, join) -> the document's tokens joined by single spaces.
 * A chunk of letters that is not in `special` (a set; None: no such shortcut) is itself; any other chunk's
 * spaced tokens come from cache (dict chunk -> str, read only here), and join(list of chunks) -> their
 * spaced tokens (caching them as it sees fit) is called once per document with the chunks not in it. */
static PyObject *spaced(PyObject *self, PyObject *args) {
    PyObject *text, *cache, *special, *join;
    if (!PyArg_ParseTuple(args, "UO!OO", &text, &PyDict_Type, &cache, &special, &join)) return NULL;
    if (special != Py_None && !PyAnySet_Check(special)) {
        PyErr_SetString(PyExc_TypeError, "special must be a set or None");
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    PyObject *parts = PyList_New(0), *missing = NULL, *fresh = NULL, *distinct = NULL, *joined = NULL;
    PyObject *result = NULL;
    if (!parts) return NULL;
    Py_ssize_t i = 0, start;
    while ((start = next_chunk(kind, data, n, &i)) >= 0) {
        PyObject *chunk = PyUnicode_Substring(text, start, i), *part = NULL;
        if (!chunk) goto done;
        int whole = whole_word(chunk, special);
        if (whole < 0) {
            Py_DECREF(chunk);
            goto done;
        }
        if (whole) {
            part = chunk;
        } else {
            part = PyDict_GetItemWithError(cache, chunk);
            if (part) {
                Py_INCREF(part);
                Py_DECREF(chunk);
            } else if (PyErr_Occurred()) {
                Py_DECREF(chunk);
                goto done;
            } else {
                /* A placeholder: the chunk itself, replaced once its tokens are known. */
                PyObject *at = PyLong_FromSsize_t(PyList_GET_SIZE(parts));
                int rc = !at || (!missing && !(missing = PyList_New(0))) || PyList_Append(missing, at) < 0;
                Py_XDECREF(at);
                if (rc) {
                    Py_DECREF(chunk);
                    goto done;
                }
                part = chunk;
            }
        }
        int rc = PyList_Append(parts, part);
        Py_DECREF(part);
        if (rc < 0) goto done;
    }
    if (missing) {
        Py_ssize_t nm = PyList_GET_SIZE(missing);
        if (!(fresh = PyDict_New())) goto done;
        for (Py_ssize_t k = 0; k < nm; k++) {
            Py_ssize_t at = PyLong_AsSsize_t(PyList_GET_ITEM(missing, k));
            if (PyDict_SetItem(fresh, PyList_GET_ITEM(parts, at), Py_None) < 0) goto done;
        }
        if (!(distinct = PySequence_List(fresh))) goto done;
        if (!(joined = PyObject_CallOneArg(join, distinct))) goto done;
        if (!PyList_Check(joined) || PyList_GET_SIZE(joined) != PyList_GET_SIZE(distinct)) {
            PyErr_SetString(PyExc_TypeError, "join must return a list with one str per chunk");
            goto done;
        }
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(distinct); k++) {
            PyObject *chunk = PyList_GET_ITEM(distinct, k), *value = PyList_GET_ITEM(joined, k);
            if (!PyUnicode_Check(value)) {
                PyErr_SetString(PyExc_TypeError, "join must return a list with one str per chunk");
                goto done;
            }
            if (PyDict_SetItem(fresh, chunk, value) < 0) goto done;
        }
        for (Py_ssize_t k = 0; k < nm; k++) {
            Py_ssize_t at = PyLong_AsSsize_t(PyList_GET_ITEM(missing, k));
            PyObject *value = PyDict_GetItemWithError(fresh, PyList_GET_ITEM(parts, at));
            if (!value) goto done;
            Py_INCREF(value);
            if (PyList_SetItem(parts, at, value) < 0) goto done;
        }
    }
    {
        PyObject *sep = PyUnicode_FromOrdinal(' ');
        if (!sep) goto done;
        result = PyUnicode_Join(sep, parts);
        Py_DECREF(sep);
    }
done:
    Py_DECREF(parts);
    Py_XDECREF(missing);
    Py_XDECREF(fresh);
    Py_XDECREF(distinct);
    Py_XDECREF(joined);
    return result;
}

static int is_bullet(Py_UCS4 ch) { return ch == 0x2022 || ch == '-'; }

/* line_marks(text) -> (len(text.splitlines()), lines whose lstrip() starts with "\u2022" or "-", lines
 * whose rstrip() ends with "..." or "\u2026"), without building the lines. */
static PyObject *line_marks(PyObject *self, PyObject *args) {
    PyObject *text;
    if (!PyArg_ParseTuple(args, "U", &text)) return NULL;
    Py_ssize_t n = PyUnicode_GET_LENGTH(text), i = 0, lines = 0, bullets = 0, ellipses = 0;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    while (i < n) {
        Py_ssize_t start = i;
        while (i < n && !Py_UNICODE_ISLINEBREAK(PyUnicode_READ(kind, data, i))) i++;
        Py_ssize_t end = i; /* the line is [start, end) */
        if (i < n) { /* a line break ends the line; "\r\n" is one */
            if (PyUnicode_READ(kind, data, i) == '\r' && i + 1 < n && PyUnicode_READ(kind, data, i + 1) == '\n')
                i++;
            i++;
        }
        lines++;
        Py_ssize_t a = start, b = end;
        while (a < b && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, a))) a++;
        while (b > a && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, b - 1))) b--;
        if (a < b && is_bullet(PyUnicode_READ(kind, data, a))) bullets++;
        if (b > a && (PyUnicode_READ(kind, data, b - 1) == 0x2026 ||
                      (b - a >= 3 && PyUnicode_READ(kind, data, b - 1) == '.' &&
                       PyUnicode_READ(kind, data, b - 2) == '.' && PyUnicode_READ(kind, data, b - 3) == '.')))
            ellipses++;
    }
    return Py_BuildValue("(nnn)", lines, bullets, ellipses);
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS, "setup(punctuation, stop_words): the symbol characters and stop words."},
    {"count", count, METH_VARARGS,
     "count(text, cache, special, tokenize, limit) -> (words, non_symbol, non_symbol_chars, alpha, "
     "stop_words)."},
    {"line_marks", line_marks, METH_VARARGS, "line_marks(text) -> (lines, bullet lines, ellipsis lines)."},
    {"spaced", spaced, METH_VARARGS, "spaced(text, cache, special, join) -> the tokens joined by spaces."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_chunks", NULL, -1, methods};

PyMODINIT_FUNC PyInit__chunks(void) { return PyModule_Create(&module); }
