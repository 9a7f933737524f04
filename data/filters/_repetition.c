/* The n-gram rules of GopherRepetition (data/filters/gopher.py): Rae et al. 2021 ("Gopher"), Table A1,
 * as datatrove 0.10.1 computes them (pipeline/filters/gopher_repetition_filter.py: get_n_grams,
 * find_top_duplicate, find_all_duplicate), on one string: the document's words joined by single spaces.
 *
 * Hashes only pick candidates: two n-grams count as equal only after their characters compare equal,
 * so a hash collision can cost time but never change a decision (`_set_hash_mask(0)` makes every hash
 * equal, for the tests).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Odd, so B^k never becomes 0 modulo 2^64. */
#define BASE 0x100000001B3ULL

static uint64_t hash_mask = ~(uint64_t)0;
static uint64_t *powers = NULL; /* powers[k] = BASE^k mod 2^64, k < n_powers; kept across calls */
static Py_ssize_t n_powers = 0;

static int
ensure_powers(Py_ssize_t n)
{
    if (n <= n_powers)
        return 0;
    Py_ssize_t size = n > 2 * n_powers ? n : 2 * n_powers;
    if (size < 4096)
        size = 4096;
    uint64_t *p = PyMem_Realloc(powers, (size_t)size * sizeof(uint64_t));
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    p[0] = 1;
    for (Py_ssize_t k = n_powers ? n_powers : 1; k < size; k++)
        p[k] = p[k - 1] * BASE;
    powers = p;
    n_powers = size;
    return 0;
}

/* A polynomial hash keeps a difference in the last character in its low bits; the multiply and
 * shifts spread it to the top bits, which pick the table slot. */
static inline uint64_t
finish(uint64_t h)
{
    h ^= h >> 31;
    h *= 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
    return h & hash_mask;
}

/* Hash of characters a..e-1 from prefix hashes pre[k] = sum_{j<k} (c_j + 1) * B^(k-1-j). */
static inline uint64_t
range_hash(const uint64_t *pre, Py_ssize_t a, Py_ssize_t e)
{
    return finish(pre[e] - pre[a] * powers[e - a]);
}

typedef struct {
    uint64_t h;
    Py_ssize_t pos; /* -1: empty */
    Py_ssize_t count;
} Slot;

typedef struct {
    int kind;             /* bytes per character (PyUnicode kind 1, 2 or 4) */
    const char *spaced;   /* the words joined by " " */
    char *joined;         /* the words concatenated */
    Py_ssize_t n_words;
    Py_ssize_t *ws;       /* word k starts at ws[k] in spaced; ws[n_words] = len(spaced) + 1 */
    Py_ssize_t *wj;       /* word k starts at wj[k] in joined; wj[n_words] = len(joined) */
    uint64_t *pre_s;      /* prefix hashes of spaced */
    uint64_t *pre_j;      /* prefix hashes of joined */
    Slot *table;
    int shift;            /* slot = hash >> shift */
    Py_ssize_t cap;
} Doc;

#define SCAN(T)                                                                        \
    do {                                                                               \
        const T *src = (const T *)data;                                                \
        T *dst = (T *)d->joined;                                                       \
        uint64_t hs = 0, hj = 0;                                                       \
        Py_ssize_t w = 0, j = 0;                                                       \
        d->ws[0] = 0;                                                                  \
        d->wj[0] = 0;                                                                  \
        d->pre_s[0] = 0;                                                               \
        d->pre_j[0] = 0;                                                               \
        for (Py_ssize_t i = 0; i < len; i++) {                                         \
            Py_UCS4 c = src[i];                                                        \
            hs = hs * BASE + c + 1;                                                    \
            d->pre_s[i + 1] = hs;                                                      \
            if (c == ' ') {                                                            \
                w++;                                                                   \
                d->ws[w] = i + 1;                                                      \
                d->wj[w] = j;                                                          \
            }                                                                          \
            else {                                                                     \
                dst[j] = (T)c;                                                         \
                hj = hj * BASE + c + 1;                                                \
                d->pre_j[++j] = hj;                                                    \
            }                                                                          \
        }                                                                              \
        d->ws[n_words] = len + 1;                                                      \
        d->wj[n_words] = j;                                                            \
    } while (0)

/* Split the words and build both prefix hashes in one pass. Returns -1 with an exception set. */
static int
doc_init(Doc *d, PyObject *spaced)
{
    memset(d, 0, sizeof(*d));
    Py_ssize_t len = PyUnicode_GET_LENGTH(spaced);
    int kind = PyUnicode_KIND(spaced);
    const void *data = PyUnicode_DATA(spaced);
    Py_ssize_t n_words = 0;
    if (len) {
        n_words = 1;
        for (Py_ssize_t i = 0; i < len; i++)
            n_words += PyUnicode_READ(kind, data, i) == ' ';
    }
    Py_ssize_t cap = 2;
    int bits = 1;
    while (cap < 2 * n_words) {
        cap <<= 1;
        bits++;
    }
    if (ensure_powers(len + 1) < 0)
        return -1;
    size_t bytes = (size_t)(2 * (n_words + 1)) * sizeof(Py_ssize_t) + (size_t)(2 * (len + 1)) * sizeof(uint64_t)
                   + (size_t)cap * sizeof(Slot) + (size_t)(len + 1) * (size_t)kind;
    char *mem = PyMem_Malloc(bytes);
    if (!mem) {
        PyErr_NoMemory();
        return -1;
    }
    d->table = (Slot *)mem; /* first: the most strictly aligned */
    d->pre_s = (uint64_t *)(d->table + cap);
    d->pre_j = d->pre_s + (len + 1);
    d->ws = (Py_ssize_t *)(d->pre_j + (len + 1));
    d->wj = d->ws + (n_words + 1);
    d->joined = (char *)(d->wj + (n_words + 1));
    d->kind = kind;
    d->spaced = data;
    d->n_words = n_words;
    d->cap = cap;
    d->shift = 64 - bits;
    if (kind == PyUnicode_1BYTE_KIND)
        SCAN(Py_UCS1);
    else if (kind == PyUnicode_2BYTE_KIND)
        SCAN(Py_UCS2);
    else
        SCAN(Py_UCS4);
    return 0;
}

static void
clear_table(Doc *d)
{
    memset(d->table, 0xff, (size_t)d->cap * sizeof(Slot)); /* pos = -1 */
}

/* datatrove find_top_duplicate(get_n_grams(words, n)): the n-grams joined by " " in a Counter;
 * most_common(1) is the highest count, and among equal counts the first inserted, i.e. the n-gram
 * first seen earliest. Returns its length times its count. Needs n <= n_words. */
static Py_ssize_t
top_gram_chars(Doc *d, Py_ssize_t n)
{
    const Py_ssize_t *ws = d->ws;
    const int kind = d->kind;
    Py_ssize_t best_count = 0, best_first = 0;
    clear_table(d);
    for (Py_ssize_t i = 0; i + n <= d->n_words; i++) {
        Py_ssize_t a = ws[i], e = ws[i + n] - 1; /* n-gram i is spaced[a:e] */
        uint64_t h = range_hash(d->pre_s, a, e);
        Py_ssize_t s = (Py_ssize_t)(h >> d->shift);
        Slot *slot;
        for (;;) {
            slot = &d->table[s];
            if (slot->pos < 0) {
                slot->h = h;
                slot->pos = i;
                slot->count = 0;
                break;
            }
            if (slot->h == h) {
                Py_ssize_t pa = ws[slot->pos], pe = ws[slot->pos + n] - 1;
                if (pe - pa == e - a && !memcmp(d->spaced + pa * kind, d->spaced + a * kind, (size_t)(e - a) * kind))
                    break;
            }
            s = (s + 1) & (d->cap - 1);
        }
        Py_ssize_t c = ++slot->count;
        if (c > best_count || (c == best_count && slot->pos < best_first)) {
            best_count = c;
            best_first = slot->pos;
        }
    }
    return (ws[best_first + n] - 1 - ws[best_first]) * best_count;
}

/* datatrove find_all_duplicate(words, n): the n-grams joined without a separator (so ("ab", "c")
 * equals ("a", "bc")), scanned left to right; one seen before adds its length and skips the next n
 * positions, else it enters the seen set. Stops early once the sum exceeds `limit` (it only grows). */
static Py_ssize_t
dup_gram_chars(Doc *d, Py_ssize_t n, double n_chars, double frac)
{
    const Py_ssize_t *wj = d->wj;
    const int kind = d->kind;
    Py_ssize_t repeated = 0, i = 0;
    clear_table(d);
    while (i + n <= d->n_words) {
        Py_ssize_t a = wj[i], e = wj[i + n]; /* n-gram i is joined[a:e] */
        uint64_t h = range_hash(d->pre_j, a, e);
        Py_ssize_t s = (Py_ssize_t)(h >> d->shift);
        int found = 0;
        for (;;) {
            Slot *slot = &d->table[s];
            if (slot->pos < 0) {
                slot->h = h;
                slot->pos = i;
                break;
            }
            if (slot->h == h) {
                Py_ssize_t pa = wj[slot->pos], pe = wj[slot->pos + n];
                if (pe - pa == e - a && !memcmp(d->joined + pa * kind, d->joined + a * kind, (size_t)(e - a) * kind)) {
                    found = 1;
                    break;
                }
            }
            s = (s + 1) & (d->cap - 1);
        }
        if (found) {
            repeated += e - a;
            if ((double)repeated / n_chars > frac)
                return repeated;
            i += n;
        }
        else
            i++;
    }
    return repeated;
}

/* rules: a sequence of (n, fraction) pairs. Returns a new list of (n, frac) as C arrays in *out. */
static int
parse_rules(PyObject *rules, Py_ssize_t **ns, double **fracs, Py_ssize_t *count)
{
    PyObject *seq = PySequence_Fast(rules, "rules must be a sequence of (n, fraction) pairs");
    if (!seq)
        return -1;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    *ns = PyMem_Malloc((size_t)(m ? m : 1) * sizeof(Py_ssize_t));
    *fracs = PyMem_Malloc((size_t)(m ? m : 1) * sizeof(double));
    if (!*ns || !*fracs) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t r = 0; r < m; r++) {
        Py_ssize_t n;
        double f;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, r), "nd", &n, &f)) {
            Py_DECREF(seq);
            return -1;
        }
        if (n < 1) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "n-gram size must be at least 1, got %zd", n);
            return -1;
        }
        (*ns)[r] = n;
        (*fracs)[r] = f;
    }
    *count = m;
    Py_DECREF(seq);
    return 0;
}

PyDoc_STRVAR(first_rule_doc,
"first_rule(spaced, n_chars, top, dup) -> str | None\n\n"
"The first n-gram rule that drops the document, as datatrove's GopherRepetitionFilter checks them:\n"
"spaced is the words joined by single spaces (\"\" for none; words hold no spaces), n_chars the\n"
"text's length, top and dup sequences of (n, fraction). A top rule drops when the first most frequent\n"
"n-gram's characters times its count over n_chars exceed the fraction (\"top_{n}_gram\"; skipped with\n"
"fewer than n words); a dup rule when the characters of repeated n-grams do\n"
"(\"duplicated_{n}_n_grams\"). Top rules are checked first, each list in its order.");

static PyObject *
first_rule(PyObject *self, PyObject *args)
{
    PyObject *spaced, *top, *dup, *result = NULL;
    Py_ssize_t n_chars;
    if (!PyArg_ParseTuple(args, "UnOO:first_rule", &spaced, &n_chars, &top, &dup))
        return NULL;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(spaced) < 0)
        return NULL;
#endif
    if (n_chars <= 0) {
        PyErr_SetString(PyExc_ValueError, "n_chars must be positive");
        return NULL;
    }
    Py_ssize_t *top_n = NULL, *dup_n = NULL, n_top = 0, n_dup = 0;
    double *top_f = NULL, *dup_f = NULL;
    Doc d;
    int have_doc = 0;
    if (parse_rules(top, &top_n, &top_f, &n_top) < 0 || parse_rules(dup, &dup_n, &dup_f, &n_dup) < 0)
        goto done;
    if (doc_init(&d, spaced) < 0)
        goto done;
    have_doc = 1;
    for (Py_ssize_t r = 0; r < n_top; r++) {
        if (top_n[r] > d.n_words)
            continue; /* no n-grams: datatrove skips the rule */
        if ((double)top_gram_chars(&d, top_n[r]) / (double)n_chars > top_f[r]) {
            result = PyUnicode_FromFormat("top_%zd_gram", top_n[r]);
            goto done;
        }
    }
    for (Py_ssize_t r = 0; r < n_dup; r++) {
        if ((double)dup_gram_chars(&d, dup_n[r], (double)n_chars, dup_f[r]) / (double)n_chars > dup_f[r]) {
            result = PyUnicode_FromFormat("duplicated_%zd_n_grams", dup_n[r]);
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    if (have_doc)
        PyMem_Free(d.table);
    PyMem_Free(top_n);
    PyMem_Free(top_f);
    PyMem_Free(dup_n);
    PyMem_Free(dup_f);
    return result;
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
