/* The repetition counts of GopherRepetition (data/filters/gopher.py): Rae et al. 2021 ("Gopher"),
 * Table A1, as datatrove 0.10.1 computes them (pipeline/filters/gopher_repetition_filter.py):
 * - first_rule: the n-gram rules (get_n_grams, find_top_duplicate, find_all_duplicate), on one string,
 *   the document's words joined by single spaces;
 * - duplicate_pieces: find_duplicates over its paragraphs or lines, without building them as strings.
 *
 * Hashes only pick candidates: two pieces count as equal only after their characters compare equal,
 * so a hash collision can cost time but never change a decision (`_set_hash_mask(0)` makes every hash
 * equal, for the tests). Lengths are in code points, as Python's len.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Odd, so B^k never becomes 0 modulo 2^64. */
#define BASE 0x100000001B3ULL

static uint64_t hash_mask = ~(uint64_t)0;

/* Buffers kept across calls: a fresh large allocation per document would be fresh pages, each one a
 * page fault. Released after a document that needed more than KEEP_BYTES. */
#define KEEP_BYTES (64u << 20)

typedef struct {
    void *p;
    size_t size;
} Buffer;

static Buffer scan_buf, table_buf, power_buf;

static void *
reserve(Buffer *b, size_t size)
{
    if (size > b->size) {
        void *p = PyMem_Realloc(b->p, size);
        if (!p) {
            PyErr_NoMemory();
            return NULL;
        }
        b->p = p;
        b->size = size;
    }
    return b->p;
}

static void
trim(Buffer *b)
{
    if (b->size > KEEP_BYTES) {
        PyMem_Free(b->p);
        b->p = NULL;
        b->size = 0;
    }
}

/* powers[k] = B^k mod 2^64 for k <= n. */
static uint64_t *powers;
static size_t n_powers;

static int
ensure_powers(size_t n)
{
    if (n < n_powers)
        return 0;
    size_t size = n + 1 > 2 * n_powers ? n + 1 : 2 * n_powers;
    uint64_t *p = reserve(&power_buf, size * sizeof(uint64_t));
    if (!p)
        return -1;
    p[0] = 1;
    for (size_t k = n_powers ? n_powers : 1; k < size; k++)
        p[k] = p[k - 1] * BASE;
    powers = p;
    n_powers = size;
    return 0;
}

/* A polynomial hash keeps a difference in the last character in its low bits; the multiply and shifts
 * spread it to the top bits, which pick the table slot. */
static inline uint64_t
finish(uint64_t h)
{
    h ^= h >> 31;
    h *= 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
    return h & hash_mask;
}

typedef struct {
    uint64_t h;
    uint32_t pos;   /* the n-gram's first position */
    uint32_t count; /* how often it occurred (top n-grams) */
} Slot;

typedef struct {
    int kind;           /* bytes per character (PyUnicode kind 1, 2 or 4) */
    const char *spaced; /* the words joined by " " */
    const char *joined; /* the words concatenated */
    uint32_t n_words;
    const uint32_t *wj; /* word k starts at wj[k] in joined (and at wj[k] + k in spaced); wj[n_words] = len(joined) */
    const uint64_t *pre; /* pre[k] = sum_{j<k} (joined[j] + 1) * B^(k-1-j): prefix hashes of joined */
    Slot *table;
    uint8_t *tags; /* a slot is full when its tag is gen: a new rule starts with an empty table in O(1) */
    uint8_t gen;
    uint32_t mask; /* slots - 1 */
    int shift;     /* slot = hash >> shift */
} Doc;

/* Hash of words i..i+n-1 concatenated: joined[wj[i]:wj[i + n]]. */
static inline uint64_t
gram_hash(const Doc *d, uint32_t i, uint32_t n)
{
    uint32_t a = d->wj[i], e = d->wj[i + n];
    return finish(d->pre[e] - d->pre[a] * powers[e - a]);
}

#define SCAN(T)                                                   \
    do {                                                          \
        const T *src = (const T *)data;                           \
        T *dst = (T *)joined;                                     \
        uint64_t h = 0;                                           \
        uint32_t w = 0, j = 0;                                    \
        for (Py_ssize_t i = 0; i < len; i++) {                    \
            T c = src[i];                                         \
            if (c == ' ') {                                       \
                wj[++w] = j;                                      \
            }                                                     \
            else {                                                \
                dst[j] = c;                                       \
                h = h * BASE + (uint64_t)c + 1;                   \
                pre[++j] = h;                                     \
            }                                                     \
        }                                                         \
        n_words = w + 1;                                          \
        wj[n_words] = j;                                          \
    } while (0)

/* Split the words and hash their characters in one pass. Returns -1 with an exception set. */
static int
doc_init(Doc *d, PyObject *spaced)
{
    Py_ssize_t len = PyUnicode_GET_LENGTH(spaced);
    int kind = PyUnicode_KIND(spaced);
    const void *data = PyUnicode_DATA(spaced);
    if (len >= INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "document too long for 32-bit positions");
        return -1;
    }
    if (ensure_powers((size_t)len) < 0)
        return -1;
    /* pre: len + 1 hashes; wj: up to len + 2 word starts (a word per character, at most); joined. */
    size_t bytes = (size_t)(len + 1) * 8 + (size_t)(len + 2) * 4 + (size_t)len * kind;
    char *mem = reserve(&scan_buf, bytes);
    if (!mem)
        return -1;
    uint64_t *pre = (uint64_t *)mem;
    uint32_t *wj = (uint32_t *)(pre + len + 1);
    char *joined = (char *)(wj + len + 2);
    uint32_t n_words = 0;
    pre[0] = 0;
    wj[0] = 0;
    if (len) {
        if (kind == PyUnicode_1BYTE_KIND)
            SCAN(Py_UCS1);
        else if (kind == PyUnicode_2BYTE_KIND)
            SCAN(Py_UCS2);
        else
            SCAN(Py_UCS4);
    }
    size_t slots = 2;
    int bits = 1;
    while (slots < 2 * (size_t)n_words) {
        slots <<= 1;
        bits++;
    }
    char *t = reserve(&table_buf, (size_t)slots * (sizeof(Slot) + 1));
    if (!t)
        return -1;
    d->table = (Slot *)t;
    d->tags = (uint8_t *)(d->table + slots);
    memset(d->tags, 0, slots);
    d->gen = 0;
    d->mask = (uint32_t)(slots - 1);
    d->shift = 64 - bits;
    d->kind = kind;
    d->spaced = data;
    d->joined = joined;
    d->n_words = n_words;
    d->wj = wj;
    d->pre = pre;
    return 0;
}

static void
clear_table(Doc *d)
{
    if (++d->gen == 0) { /* tags wrapped: clear them for real */
        memset(d->tags, 0, (size_t)d->mask + 1);
        d->gen = 1;
    }
}

/* datatrove find_top_duplicate(get_n_grams(words, n)): the n-grams joined by " " in a Counter;
 * most_common(1) is the highest count, and among equal counts the first inserted, i.e. the one whose
 * first occurrence comes first. Returns its length times its count. Needs 1 <= n <= n_words. The hash
 * is of the words concatenated (("ab", "c") and ("a", "bc") share one); the compare is with spaces. */
static uint64_t
top_gram_chars(Doc *d, uint32_t n)
{
    const uint32_t *wj = d->wj;
    const int kind = d->kind;
    uint32_t best_count = 0, best_first = 0;
    clear_table(d);
    for (uint32_t i = 0; i + n <= d->n_words; i++) {
        uint32_t a = wj[i] + i, e = wj[i + n] + i + n - 1; /* n-gram i is spaced[a:e] */
        uint64_t h = gram_hash(d, i, n);
        uint32_t s = (uint32_t)(h >> d->shift);
        Slot *slot;
        for (;; s = (s + 1) & d->mask) {
            slot = &d->table[s];
            if (d->tags[s] != d->gen) {
                d->tags[s] = d->gen;
                slot->h = h;
                slot->pos = i;
                slot->count = 0;
                break;
            }
            if (slot->h == h) {
                uint32_t p = slot->pos, pa = wj[p] + p, pe = wj[p + n] + p + n - 1;
                if (pe - pa == e - a
                    && !memcmp(d->spaced + (size_t)pa * kind, d->spaced + (size_t)a * kind, (size_t)(e - a) * kind))
                    break;
            }
        }
        uint32_t c = ++slot->count;
        if (c > best_count || (c == best_count && slot->pos < best_first)) {
            best_count = c;
            best_first = slot->pos;
        }
    }
    uint32_t p = best_first;
    return (uint64_t)(wj[p + n] - wj[p] + n - 1) * best_count;
}

/* datatrove find_all_duplicate(words, n): the n-grams joined without a separator (so ("ab", "c")
 * equals ("a", "bc")), scanned left to right; one seen before adds its length and skips to the
 * position after it, else it enters the seen set. Stops once the decision is known: the sum only grows,
 * and it can grow by at most the characters not yet scanned. Returns the sum, or a value on the same
 * side of the threshold. */
static uint64_t
dup_gram_chars(Doc *d, uint32_t n, double n_chars, double frac)
{
    const uint32_t *wj = d->wj;
    const int kind = d->kind;
    const uint32_t total = wj[d->n_words];
    uint64_t repeated = 0;
    uint32_t i = 0;
    clear_table(d);
    while (i + n <= d->n_words) {
        uint32_t a = wj[i], e = wj[i + n]; /* n-gram i is joined[a:e] */
        if ((double)(repeated + (total - a)) / n_chars <= frac)
            return repeated; /* even if all the rest repeated, the fraction stays at or under frac */
        uint64_t h = gram_hash(d, i, n);
        uint32_t s = (uint32_t)(h >> d->shift);
        int found = 0;
        for (;; s = (s + 1) & d->mask) {
            Slot *slot = &d->table[s];
            if (d->tags[s] != d->gen) {
                d->tags[s] = d->gen;
                slot->h = h;
                slot->pos = i;
                break;
            }
            if (slot->h == h) {
                uint32_t pa = wj[slot->pos], pe = wj[slot->pos + n];
                if (pe - pa == e - a
                    && !memcmp(d->joined + (size_t)pa * kind, d->joined + (size_t)a * kind, (size_t)(e - a) * kind)) {
                    found = 1;
                    break;
                }
            }
        }
        if (found) {
            repeated += e - a;
            if ((double)repeated / n_chars > frac)
                return repeated; /* the sum only grows */
            i += n;
        }
        else
            i++;
    }
    return repeated;
}

typedef struct {
    Py_ssize_t n;
    double frac;
} Rule;

/* A sequence of (n, fraction) pairs into rules[0..*count-1] (at most max_rules). */
static int
parse_rules(PyObject *obj, Rule *rules, Py_ssize_t max_rules, Py_ssize_t *count)
{
    PyObject *seq = PySequence_Fast(obj, "rules must be a sequence of (n, fraction) pairs");
    if (!seq)
        return -1;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    if (m > max_rules) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "at most %zd rules of a kind", max_rules);
        return -1;
    }
    for (Py_ssize_t r = 0; r < m; r++) {
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, r), "nd", &rules[r].n, &rules[r].frac)) {
            Py_DECREF(seq);
            return -1;
        }
        if (rules[r].n < 1) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "n-gram size must be at least 1, got %zd", rules[r].n);
            return -1;
        }
    }
    *count = m;
    Py_DECREF(seq);
    return 0;
}

#define MAX_RULES 64

PyDoc_STRVAR(first_rule_doc,
"first_rule(spaced, n_chars, top, dup) -> str | None\n\n"
"The first n-gram rule that drops the document, checked as datatrove's GopherRepetitionFilter does:\n"
"spaced is the words joined by single spaces (\"\" for none; words hold no spaces), n_chars the\n"
"text's length, top and dup sequences of (n, fraction). A top rule drops when the first most frequent\n"
"n-gram's characters times its count, over n_chars, exceed the fraction (\"top_{n}_gram\"; skipped\n"
"with fewer than n words); a dup rule when the characters of repeated n-grams do\n"
"(\"duplicated_{n}_n_grams\"). Top rules come first, each sequence in its own order.");

static PyObject *
first_rule(PyObject *self, PyObject *args)
{
    PyObject *spaced, *top_obj, *dup_obj, *result = NULL;
    Py_ssize_t n_chars, n_top, n_dup;
    Rule top[MAX_RULES], dup[MAX_RULES];
    Doc d;
    if (!PyArg_ParseTuple(args, "UnOO:first_rule", &spaced, &n_chars, &top_obj, &dup_obj))
        return NULL;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(spaced) < 0)
        return NULL;
#endif
    if (n_chars <= 0) {
        PyErr_SetString(PyExc_ValueError, "n_chars must be positive");
        return NULL;
    }
    if (parse_rules(top_obj, top, MAX_RULES, &n_top) < 0 || parse_rules(dup_obj, dup, MAX_RULES, &n_dup) < 0)
        return NULL;
    if (doc_init(&d, spaced) < 0)
        goto done;
    for (Py_ssize_t r = 0; r < n_top; r++) {
        if (top[r].n > d.n_words)
            continue; /* no n-grams: datatrove skips the rule */
        if ((double)top_gram_chars(&d, (uint32_t)top[r].n) / (double)n_chars > top[r].frac) {
            result = PyUnicode_FromFormat("top_%zd_gram", top[r].n);
            goto done;
        }
    }
    for (Py_ssize_t r = 0; r < n_dup; r++) {
        uint64_t chars = 0; /* fewer words than n: no n-grams, no repeated characters */
        if (dup[r].n <= d.n_words)
            chars = dup_gram_chars(&d, (uint32_t)dup[r].n, (double)n_chars, dup[r].frac);
        if ((double)chars / (double)n_chars > dup[r].frac) {
            result = PyUnicode_FromFormat("duplicated_%zd_n_grams", dup[r].n);
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    trim(&scan_buf);
    trim(&table_buf);
    trim(&power_buf);
    if (!power_buf.p) /* trimmed */
        n_powers = 0;
    return result;
}

/* The next newline in src[i:end], or end. */
static inline Py_ssize_t
next_newline(int kind, const void *data, Py_ssize_t i, Py_ssize_t end)
{
    if (kind == PyUnicode_1BYTE_KIND) {
        const char *p = memchr((const char *)data + i, '\n', (size_t)(end - i));
        return p ? p - (const char *)data : end;
    }
    while (i < end && PyUnicode_READ(kind, data, i) != '\n')
        i++;
    return i;
}

/* A hash of a piece's bytes, 8 at a time: the pieces are only compared among themselves, all of one
 * kind, so equal pieces have equal bytes. */
static inline uint64_t
bytes_hash(const char *p, size_t size)
{
    uint64_t h = size, w;
    for (; size >= 8; p += 8, size -= 8) {
        memcpy(&w, p, 8);
        h = (h ^ w) * 0x9E3779B97F4A7C15ULL;
        h ^= h >> 29;
    }
    w = 0;
    memcpy(&w, p, size);
    return finish((h ^ w) * 0x9E3779B97F4A7C15ULL);
}

PyDoc_STRVAR(duplicate_pieces_doc,
"duplicate_pieces(text, paragraphs) -> (pieces, repeated, repeated_chars)\n\n"
"datatrove's find_duplicates over its paragraphs, re.split(r\"\\n{2,}\", text.strip()), or (paragraphs\n"
"false) its lines, re.split(\"\\n+\", text): how many pieces, how many are equal to an earlier one, and\n"
"their characters (every occurrence after the first).");

static PyObject *
duplicate_pieces(PyObject *self, PyObject *args)
{
    PyObject *text;
    int paragraphs;
    if (!PyArg_ParseTuple(args, "Up:duplicate_pieces", &text, &paragraphs))
        return NULL;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(text) < 0)
        return NULL;
#endif
    Py_ssize_t len = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    if (len >= INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "document too long for 32-bit positions");
        return NULL;
    }
    Py_ssize_t start = 0, end = len, min_run = 1;
    if (paragraphs) { /* str.strip(): Unicode whitespace at both ends */
        while (start < end && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, start)))
            start++;
        while (end > start && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, end - 1)))
            end--;
        min_run = 2;
    }
    /* At most one piece per newline, plus one. */
    uint32_t *bounds = reserve(&scan_buf, (size_t)(end - start + 1) * 2 * sizeof(uint32_t));
    if (!bounds)
        return NULL;
    /* Pieces of text[start:end] between runs of at least min_run newlines, as (start, end) pairs. */
    uint32_t n = 0;
    Py_ssize_t piece = start, i = start;
    while ((i = next_newline(kind, data, i, end)) < end) {
        Py_ssize_t run = i;
        while (i < end && PyUnicode_READ(kind, data, i) == '\n')
            i++;
        if (i - run >= min_run) {
            bounds[2 * n] = (uint32_t)piece;
            bounds[2 * n + 1] = (uint32_t)run;
            n++;
            piece = i;
        }
    }
    bounds[2 * n] = (uint32_t)piece;
    bounds[2 * n + 1] = (uint32_t)end;
    n++;
    size_t slots = 2;
    int bits = 1;
    while (slots < 2 * (size_t)n) {
        slots <<= 1;
        bits++;
    }
    char *t = reserve(&table_buf, slots * (sizeof(Slot) + 1));
    if (!t)
        return NULL;
    Slot *table = (Slot *)t;
    uint8_t *used = (uint8_t *)(table + slots);
    memset(used, 0, slots);
    const char *chars = data;
    uint64_t repeated = 0, repeated_chars = 0;
    for (uint32_t r = 0; r < n; r++) {
        uint32_t a = bounds[2 * r], e = bounds[2 * r + 1];
        uint64_t h = bytes_hash(chars + (size_t)a * kind, (size_t)(e - a) * kind);
        size_t s = (size_t)(h >> (64 - bits));
        for (;; s = (s + 1) & (slots - 1)) {
            if (!used[s]) {
                used[s] = 1;
                table[s].h = h;
                table[s].pos = r;
                break;
            }
            if (table[s].h == h) {
                uint32_t pa = bounds[2 * table[s].pos], pe = bounds[2 * table[s].pos + 1];
                if (pe - pa == e - a && !memcmp(chars + (size_t)pa * kind, chars + (size_t)a * kind, (size_t)(e - a) * kind)) {
                    repeated++;
                    repeated_chars += e - a;
                    break;
                }
            }
        }
    }
    trim(&scan_buf);
    trim(&table_buf);
    return Py_BuildValue("IKK", n, (unsigned long long)repeated, (unsigned long long)repeated_chars);
}

static PyObject *
set_hash_mask(PyObject *self, PyObject *arg)
{
    unsigned long long mask = PyLong_AsUnsignedLongLongMask(arg);
    if (mask == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    uint64_t old = hash_mask;
    hash_mask = (uint64_t)mask;
    return PyLong_FromUnsignedLongLong(old);
}

static PyMethodDef methods[] = {
    {"first_rule", first_rule, METH_VARARGS, first_rule_doc},
    {"duplicate_pieces", duplicate_pieces, METH_VARARGS, duplicate_pieces_doc},
    {"_set_hash_mask", set_hash_mask, METH_O,
     "Set the mask ANDed into every hash and return the previous one (0: every hash equal; tests only)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "data.filters._repetition",
    "Gopher repetition n-gram rules (datatrove 0.10.1 semantics) in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__repetition(void)
{
    return PyModule_Create(&module);
}
