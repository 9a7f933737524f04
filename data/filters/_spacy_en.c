/* spaCy's English tokenizer per whitespace-free chunk, in C: a port of spacy/tokenizer.pyx (3.8):
 * _split_affixes, _attach_tokens and _apply_special_cases, on the backtracking matcher of
 * data/filters/_matcher.c (data/filters/_matcher.h; the same extension module) for the programs
 * data/filters/spacy_en.py compiles from spaCy's prefix, suffix, infix and URL patterns (Python `re`
 * semantics). Strings are read in place from their PyUnicode buffers (1, 2 or 4 bytes a code point; lone
 * surrogates are code points like others). */
#include "_matcher.h"

#include <stdlib.h>
#include <string.h>

/* ---- a hash table of code point strings -> int ---- */

typedef struct {
    Py_UCS4 *key;
    Py_ssize_t len;
    int value; /* -1: empty slot */
} Entry;

typedef struct {
    Entry *slots;
    Py_ssize_t mask;
    Py_ssize_t maxlen;
    uint64_t bloom[64]; /* bits of (length, first, last character) of the keys: most misses stop here */
} Table;

static inline unsigned bloom_bit(Py_ssize_t len, Py_UCS4 first, Py_UCS4 last) {
    uint32_t h = (uint32_t)len * 0x9E3779B1u ^ first * 0x85EBCA77u ^ last * 0xC2B2AE3Du;
    return (h ^ (h >> 15)) & 4095;
}

static inline uint64_t hash_str(const Str *s, Py_ssize_t a, Py_ssize_t b) {
    uint64_t h = 1469598103934665603ULL ^ (uint64_t)(b - a);
    for (Py_ssize_t i = a; i < b; i++) h = (h ^ rd(s, i)) * 1099511628211ULL;
    return h ^ (h >> 29);
}

static int table_init(Table *t, Py_ssize_t n) {
    Py_ssize_t size = 16;
    while (size < 2 * n) size *= 2;
    t->slots = malloc(size * sizeof(Entry));
    if (!t->slots) return -1;
    for (Py_ssize_t i = 0; i < size; i++) {
        t->slots[i].key = NULL;
        t->slots[i].value = -1;
    }
    t->mask = size - 1;
    t->maxlen = 0;
    memset(t->bloom, 0, sizeof(t->bloom));
    return 0;
}

static void table_free(Table *t) {
    if (!t->slots) return;
    for (Py_ssize_t i = 0; i <= t->mask; i++) free(t->slots[i].key);
    free(t->slots);
    t->slots = NULL;
}

static int table_get_empty(const Table *t) {
    for (Py_ssize_t i = 0; i <= t->mask; i++)
        if (t->slots[i].value >= 0 && t->slots[i].len == 0) return t->slots[i].value;
    return -1;
}

/* The value of s[a:b], or -1. */
static int table_get(const Table *t, const Str *s, Py_ssize_t a, Py_ssize_t b) {
    if (b - a > t->maxlen || b == a) return b == a ? table_get_empty(t) : -1;
    unsigned bit = bloom_bit(b - a, rd(s, a), rd(s, b - 1));
    if (!((t->bloom[bit >> 6] >> (bit & 63)) & 1)) return -1;
    uint64_t h = hash_str(s, a, b);
    for (Py_ssize_t i = (Py_ssize_t)(h & t->mask);; i = (i + 1) & t->mask) {
        Entry *e = &t->slots[i];
        if (e->value < 0) return -1;
        if (e->len != b - a) continue;
        Py_ssize_t j = 0;
        while (j < e->len && e->key[j] == rd(s, a + j)) j++;
        if (j == e->len) return e->value;
    }
}

static int table_set(Table *t, PyObject *str, int value) {
    Str s = {PyUnicode_DATA(str), PyUnicode_KIND(str), 0, PyUnicode_GET_LENGTH(str)};
    Py_ssize_t len = s.end;
    uint64_t h = hash_str(&s, 0, len);
    Py_ssize_t i = (Py_ssize_t)(h & t->mask);
    while (t->slots[i].value >= 0) i = (i + 1) & t->mask;
    Entry *e = &t->slots[i];
    e->key = malloc((len ? len : 1) * sizeof(Py_UCS4));
    if (!e->key) return -1;
    for (Py_ssize_t j = 0; j < len; j++) e->key[j] = rd(&s, j);
    e->len = len;
    e->value = value;
    if (len > t->maxlen) t->maxlen = len;
    if (len) {
        unsigned bit = bloom_bit(len, rd(&s, 0), rd(&s, len - 1));
        t->bloom[bit >> 6] |= 1ULL << (bit & 63);
    }
    return 0;
}

/* ---- the tokenizer ---- */

typedef struct {
    Prog prefix, suffix, infix, url;
    int has_url, url_needs_dot, letters_whole;
    Table specials; /* key -> offset in lens: n, then the pieces' lengths */
    Table patterns; /* joined text -> first pattern; chained through pat_next */
    int *lens;
    int *pat_lens; /* per pattern: offset in lens (n, lengths) */
    int *pat_next;
    Py_ssize_t maxpat;
    Ctx cx;
} Tok;

typedef struct {
    Py_ssize_t *v; /* start, end pairs */
    Py_ssize_t n, cap;
} Spans;

static int spans_push(Spans *sp, Py_ssize_t a, Py_ssize_t b) {
    if (sp->n == sp->cap) {
        Py_ssize_t cap = sp->cap ? 2 * sp->cap : 32;
        Py_ssize_t *v = realloc(sp->v, 2 * cap * sizeof(Py_ssize_t));
        if (!v) return -1;
        sp->v = v;
        sp->cap = cap;
    }
    sp->v[2 * sp->n] = a;
    sp->v[2 * sp->n + 1] = b;
    sp->n++;
    return 0;
}

static int push_special(const Tok *T, Spans *out, int off, Py_ssize_t a) {
    int n = T->lens[off];
    for (int i = 0; i < n; i++) {
        if (spans_push(out, a, a + T->lens[off + 1 + i]) < 0) return -1;
        a += T->lens[off + 1 + i];
    }
    return 0;
}

/* The length of the first match of p searched on s[a:b] (spaCy's find_prefix / find_suffix). */
static Py_ssize_t find_len(Tok *T, const Prog *p, const Str *chunk, Py_ssize_t a, Py_ssize_t b) {
    Str s = {chunk->data, chunk->kind, a, b};
    Py_ssize_t ms, me = matcher_search(&T->cx, p, &s, a, 0, &ms);
    return me >= 0 ? me - ms : me == -1 ? 0 : me;
}

/* The tokens of s before special cases merge any (spaCy's _split_affixes + _attach_tokens). */
static int affix_tokens(Tok *T, const Str *chunk, Spans *out, Spans *pre, Spans *suf) {
    Py_ssize_t a = 0, b = chunk->end, last_size = 0;
    int sp;
    pre->n = suf->n = 0;
    while (b > a && b - a != last_size) {
        if (table_get(&T->specials, chunk, a, b) >= 0) break;
        last_size = b - a;
        Py_ssize_t pre_len = find_len(T, &T->prefix, chunk, a, b);
        if (pre_len < 0) return (int)pre_len;
        if (pre_len && a + pre_len < b && table_get(&T->specials, chunk, a + pre_len, b) >= 0) {
            if (spans_push(pre, a, a + pre_len) < 0) return -3;
            a += pre_len;
            break;
        }
        Py_ssize_t suf_len = find_len(T, &T->suffix, chunk, a + pre_len, b);
        if (suf_len < 0) return (int)suf_len;
        if (suf_len && b - suf_len > a && table_get(&T->specials, chunk, a, b - suf_len) >= 0) {
            if (spans_push(suf, b - suf_len, b) < 0) return -3;
            b -= suf_len;
            break;
        }
        if (pre_len && suf_len && pre_len + suf_len <= b - a) {
            if (spans_push(pre, a, a + pre_len) < 0 || spans_push(suf, b - suf_len, b) < 0) return -3;
            a += pre_len;
            b -= suf_len;
        } else if (pre_len) {
            if (spans_push(pre, a, a + pre_len) < 0) return -3;
            a += pre_len;
        } else if (suf_len) {
            if (spans_push(suf, b - suf_len, b) < 0) return -3;
            b -= suf_len;
        }
    }
    for (Py_ssize_t i = 0; i < pre->n; i++)
        if (spans_push(out, pre->v[2 * i], pre->v[2 * i + 1]) < 0) return -3;
    if (b > a) {
        Str s = {chunk->data, chunk->kind, a, b};
        int url = 0;
        if ((sp = table_get(&T->specials, chunk, a, b)) >= 0) {
            if (push_special(T, out, sp, a) < 0) return -3;
            goto suffixes;
        }
        if (T->has_url) {
            int dot = !T->url_needs_dot;
            for (Py_ssize_t i = a; i < b && !dot; i++) dot = rd(chunk, i) == '.';
            if (dot) {
                T->cx.steps = 0;
                Py_ssize_t r = matcher_run(&T->cx, &T->url, &s, 0, a, -1);
                if (r < -1) return (int)r;
                url = r >= 0;
            }
        }
        if (url) {
            if (spans_push(out, a, b) < 0) return -3;
        } else {
            /* find_infix: a match at the string's start is skipped, an empty one makes no token */
            Py_ssize_t start = a, from = a, ms, me;
            int must_advance = 0;
            while (from <= b) {
                me = matcher_search(&T->cx, &T->infix, &s, from, must_advance, &ms);
                if (me == -1) break;
                if (me < -1) return (int)me;
                must_advance = me == ms;
                from = me;
                if (ms == a) continue;
                if (ms != start && spans_push(out, start, ms) < 0) return -3;
                if (ms != me && spans_push(out, ms, me) < 0) return -3;
                start = me;
            }
            if (start < b && spans_push(out, start, b) < 0) return -3;
        }
    }
suffixes:
    for (Py_ssize_t i = suf->n - 1; i >= 0; i--)
        if (spans_push(out, suf->v[2 * i], suf->v[2 * i + 1]) < 0) return -3;
    return 0;
}

/* spaCy's _apply_special_cases on one chunk's tokens: find every run of tokens equal to a special
 * case's affix tokens, keep the longest first (then the leftmost) among runs that overlap at their
 * first or last token, and replace each kept run that is a special case by its pieces. */
static int apply_specials(Tok *T, const Str *chunk, Spans *toks, Spans *matches, Spans *tmp) {
    Py_ssize_t m = toks->n;
    matches->n = 0;
    for (Py_ssize_t i = 0; i < m; i++) {
        for (Py_ssize_t L = 1; L <= T->maxpat && i + L <= m; L++) {
            Py_ssize_t a = toks->v[2 * i], b = toks->v[2 * (i + L - 1) + 1];
            if (b - a > T->patterns.maxlen) break;
            for (int pid = table_get(&T->patterns, chunk, a, b); pid >= 0; pid = T->pat_next[pid]) {
                const int *pl = T->lens + T->pat_lens[pid];
                if (pl[0] != L) continue;
                Py_ssize_t j = 0;
                while (j < L && toks->v[2 * (i + j) + 1] - toks->v[2 * (i + j)] == pl[1 + j]) j++;
                if (j == L) {
                    if (spans_push(matches, i, i + L) < 0) return -3;
                    break;
                }
            }
        }
    }
    if (!matches->n) return 0;
    /* Keep: longest first, then leftmost; a run is dropped when its first or last token is already
     * taken, and every run marks its tokens taken (kept or not), as spaCy's _filter_special_spans. */
    char *seen = calloc(m, 1), *keep = calloc(matches->n, 1);
    if (!seen || !keep) {
        free(seen);
        free(keep);
        return -3;
    }
    for (;;) {
        Py_ssize_t best = -1;
        for (Py_ssize_t q = 0; q < matches->n; q++) {
            if (keep[q]) continue;
            if (best < 0) {
                best = q;
                continue;
            }
            Py_ssize_t lq = matches->v[2 * q + 1] - matches->v[2 * q];
            Py_ssize_t lb = matches->v[2 * best + 1] - matches->v[2 * best];
            if (lq > lb || (lq == lb && matches->v[2 * q] < matches->v[2 * best])) best = q;
        }
        if (best < 0) break;
        Py_ssize_t s0 = matches->v[2 * best], s1 = matches->v[2 * best + 1];
        keep[best] = (!seen[s0] && !seen[s1 - 1]) ? 1 : 2;
        for (Py_ssize_t t = s0; t < s1; t++) seen[t] = 1;
    }
    free(seen);
    tmp->n = 0;
    Py_ssize_t i = 0;
    while (i < m) {
        Py_ssize_t q, found = -1;
        for (q = 0; q < matches->n; q++)
            if (keep[q] == 1 && matches->v[2 * q] == i) found = q;
        if (found < 0) {
            if (spans_push(tmp, toks->v[2 * i], toks->v[2 * i + 1]) < 0) goto nomem;
            i++;
            continue;
        }
        Py_ssize_t end = matches->v[2 * found + 1];
        Py_ssize_t a = toks->v[2 * i], b = toks->v[2 * (end - 1) + 1];
        int sp = table_get(&T->specials, chunk, a, b);
        if (sp >= 0) {
            if (push_special(T, tmp, sp, a) < 0) goto nomem;
        } else {
            for (Py_ssize_t t = i; t < end; t++)
                if (spans_push(tmp, toks->v[2 * t], toks->v[2 * t + 1]) < 0) goto nomem;
        }
        i = end;
    }
    free(keep);
    Spans swap = *toks;
    *toks = *tmp;
    *tmp = swap;
    return 0;
nomem:
    free(keep);
    return -3;
}

static void tok_free(Tok *T) {
    matcher_prog_free(&T->prefix);
    matcher_prog_free(&T->suffix);
    matcher_prog_free(&T->infix);
    matcher_prog_free(&T->url);
    table_free(&T->specials);
    table_free(&T->patterns);
    free(T->lens);
    free(T->pat_lens);
    free(T->pat_next);
    free(T->cx.st);
    free(T);
}

static void capsule_free(PyObject *cap) {
    Tok *T = PyCapsule_GetPointer(cap, "spacy_en.Tok");
    if (T) tok_free(T);
}

static int ready(PyObject *s) {
    if (!PyUnicode_Check(s)) {
        PyErr_SetString(PyExc_TypeError, "expected str");
        return -1;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(s) < 0) return -1;
#endif
    return 0;
}

/* build(progs, url_prog, specials, patterns, url_needs_dot, letters_whole) -> capsule */
static PyObject *py_build(PyObject *self, PyObject *args) {
    PyObject *progs, *url, *specials, *patterns;
    int url_needs_dot, letters_whole;
    if (!PyArg_ParseTuple(args, "OOO!O!pp", &progs, &url, &PyDict_Type, &specials, &PyList_Type, &patterns,
                          &url_needs_dot, &letters_whole))
        return NULL;
    Tok *T = calloc(1, sizeof(Tok));
    if (!T) return PyErr_NoMemory();
    if (!PyTuple_Check(progs) && !PyList_Check(progs)) {
        PyErr_SetString(PyExc_TypeError, "progs: (prefix, suffix, infix)");
        goto err;
    }
    if (PySequence_Size(progs) != 3) {
        PyErr_SetString(PyExc_ValueError, "progs: (prefix, suffix, infix)");
        goto err;
    }
    Prog *dst[3] = {&T->prefix, &T->suffix, &T->infix};
    for (int i = 0; i < 3; i++) {
        PyObject *t = PySequence_GetItem(progs, i);
        int rc = t ? matcher_prog_load(dst[i], t) : -1;
        Py_XDECREF(t);
        if (rc < 0) goto err;
    }
    if (url != Py_None) {
        if (matcher_prog_load(&T->url, url) < 0) goto err;
        T->has_url = 1;
    }
    T->url_needs_dot = url_needs_dot;
    T->letters_whole = letters_whole;
    Py_ssize_t nspec = PyDict_Size(specials), npat = PyList_GET_SIZE(patterns), total = 0;
    PyObject *key, *val;
    Py_ssize_t it = 0;
    while (PyDict_Next(specials, &it, &key, &val)) total += 1 + PySequence_Size(val);
    for (Py_ssize_t i = 0; i < npat; i++)
        total += 1 + PySequence_Size(PyTuple_GetItem(PyList_GET_ITEM(patterns, i), 1));
    if (PyErr_Occurred()) goto err;
    T->lens = malloc((total + 1) * sizeof(int));
    T->pat_lens = malloc((npat + 1) * sizeof(int));
    T->pat_next = malloc((npat + 1) * sizeof(int));
    if (!T->lens || !T->pat_lens || !T->pat_next || table_init(&T->specials, nspec) < 0 ||
        table_init(&T->patterns, npat) < 0) {
        PyErr_NoMemory();
        goto err;
    }
    int off = 0;
    it = 0;
    while (PyDict_Next(specials, &it, &key, &val)) {
        if (ready(key) < 0) goto err;
        Py_ssize_t n = PySequence_Size(val);
        T->lens[off] = (int)n;
        for (Py_ssize_t j = 0; j < n; j++) {
            PyObject *x = PySequence_GetItem(val, j);
            T->lens[off + 1 + j] = x ? (int)PyLong_AsLong(x) : -1;
            Py_XDECREF(x);
        }
        if (PyErr_Occurred() || table_set(&T->specials, key, off) < 0) goto err;
        off += 1 + (int)n;
    }
    T->maxpat = 0;
    for (Py_ssize_t i = 0; i < npat; i++) {
        PyObject *pair = PyList_GET_ITEM(patterns, i), *text, *lens;
        if (!PyArg_ParseTuple(pair, "UO", &text, &lens) || ready(text) < 0) goto err;
        Py_ssize_t n = PySequence_Size(lens);
        T->pat_lens[i] = off;
        T->lens[off] = (int)n;
        for (Py_ssize_t j = 0; j < n; j++) {
            PyObject *x = PySequence_GetItem(lens, j);
            T->lens[off + 1 + j] = x ? (int)PyLong_AsLong(x) : -1;
            Py_XDECREF(x);
        }
        if (PyErr_Occurred()) goto err;
        off += 1 + (int)n;
        if (n > T->maxpat) T->maxpat = n;
        /* chain patterns with the same text */
        Str s = {PyUnicode_DATA(text), PyUnicode_KIND(text), 0, PyUnicode_GET_LENGTH(text)};
        int prev = table_get(&T->patterns, &s, 0, s.end);
        if (prev >= 0) {
            T->pat_next[i] = T->pat_next[prev];
            T->pat_next[prev] = (int)i;
        } else {
            T->pat_next[i] = -1;
            if (table_set(&T->patterns, text, (int)i) < 0) {
                PyErr_NoMemory();
                goto err;
            }
        }
    }
    PyObject *cap = PyCapsule_New(T, "spacy_en.Tok", capsule_free);
    if (!cap) goto err;
    return cap;
err:
    tok_free(T);
    return NULL;
}

typedef struct {
    Spans toks, pre, suf, matches, tmp;
} Work;

static void work_free(Work *w) {
    free(w->toks.v);
    free(w->pre.v);
    free(w->suf.v);
    free(w->matches.v);
    free(w->tmp.v);
}

/* One chunk's tokens as a new tuple ((chunk,) when it is one token), Py_None (new reference) where a
 * search gave up, NULL on error. */
static PyObject *chunk_tokens(Tok *T, PyObject *chunk, Work *w) {
    if (ready(chunk) < 0) return NULL;
    Py_ssize_t len = PyUnicode_GET_LENGTH(chunk);
    Str s = {PyUnicode_DATA(chunk), PyUnicode_KIND(chunk), 0, len};
    PyObject *res;
    w->toks.n = 0;
    if (len == 0) return PyTuple_New(0);
    int whole = 0;
    if (T->letters_whole) {
        Py_ssize_t i = 0;
        while (i < len && Py_UNICODE_ISALPHA(rd(&s, i))) i++;
        whole = i == len && table_get(&T->specials, &s, 0, len) < 0;
    }
    if (!whole) {
        int sp = table_get(&T->specials, &s, 0, len), rc;
        if (sp >= 0)
            rc = push_special(T, &w->toks, sp, 0) < 0 ? -3 : 0;
        else
            rc = affix_tokens(T, &s, &w->toks, &w->pre, &w->suf);
        if (rc == 0) rc = apply_specials(T, &s, &w->toks, &w->matches, &w->tmp);
        if (rc == GAVE_UP) Py_RETURN_NONE;
        if (rc < 0) {
            PyErr_SetString(PyExc_MemoryError, "spacy_en: out of memory or bad program");
            return NULL;
        }
        whole = w->toks.n == 1 && w->toks.v[0] == 0 && w->toks.v[1] == len;
    }
    if (whole) {
        res = PyTuple_Pack(1, chunk);
    } else {
        res = PyTuple_New(w->toks.n);
        for (Py_ssize_t t = 0; res && t < w->toks.n; t++) {
            PyObject *piece = PyUnicode_Substring(chunk, w->toks.v[2 * t], w->toks.v[2 * t + 1]);
            if (!piece) {
                Py_CLEAR(res);
                break;
            }
            PyTuple_SET_ITEM(res, t, piece);
        }
    }
    /* A tuple of strs can be in no reference cycle: untracked, the garbage collector need not visit
     * the millions a cache holds (CPython would untrack it at its next collection anyway). */
    if (res) PyObject_GC_UnTrack(res);
    return res;
}

/* tokenize(capsule, chunks) -> list: per chunk a tuple of token strs, or None where a search gave up. */
static PyObject *py_tokenize(PyObject *self, PyObject *args) {
    PyObject *cap, *chunks;
    if (!PyArg_ParseTuple(args, "OO", &cap, &chunks)) return NULL;
    Tok *T = PyCapsule_GetPointer(cap, "spacy_en.Tok");
    if (!T) return NULL;
    PyObject *seq = PySequence_Fast(chunks, "chunks must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    Work w = {0};
    for (Py_ssize_t ci = 0; out && ci < n; ci++) {
        PyObject *res = chunk_tokens(T, PySequence_Fast_GET_ITEM(seq, ci), &w);
        if (!res) Py_CLEAR(out);
        else PyList_SET_ITEM(out, ci, res);
    }
    Py_DECREF(seq);
    work_free(&w);
    return out;
}

/* Tokenize each chunk of the iterable into the dicts tokens (its tuple) and spaced (its tokens joined
 * by " "); returns the list of chunks where a search gave up. */
static PyObject *fill(Tok *T, PyObject *chunks, PyObject *tokens, PyObject *spaced) {
    PyObject *it = PyObject_GetIter(chunks), *hard = PyList_New(0), *space = PyUnicode_FromString(" ");
    PyObject *chunk;
    Work w = {0};
    if (!it || !hard || !space) goto err;
    while ((chunk = PyIter_Next(it))) {
        PyObject *res = chunk_tokens(T, chunk, &w), *joined = NULL;
        int rc = -1;
        if (res == Py_None)
            rc = PyList_Append(hard, chunk);
        else if (res) {
            if (PyTuple_GET_SIZE(res) == 1) {
                joined = PyTuple_GET_ITEM(res, 0);
                Py_INCREF(joined);
            } else
                joined = PyUnicode_Join(space, res);
            if (joined && PyDict_SetItem(tokens, chunk, res) == 0) rc = PyDict_SetItem(spaced, chunk, joined);
        }
        Py_XDECREF(res);
        Py_XDECREF(joined);
        Py_DECREF(chunk);
        if (rc < 0) goto err;
    }
    if (PyErr_Occurred()) goto err;
    Py_DECREF(it);
    Py_DECREF(space);
    work_free(&w);
    return hard;
err:
    Py_XDECREF(it);
    Py_XDECREF(hard);
    Py_XDECREF(space);
    work_free(&w);
    return NULL;
}

/* tokenize_into(capsule, chunks, tokens, spaced) -> the chunks where a search gave up; every other
 * chunk goes into the dicts (see fill), without a Python-level list, zip and join per chunk. */
static PyObject *py_tokenize_into(PyObject *self, PyObject *args) {
    PyObject *cap, *chunks, *tokens, *spaced;
    if (!PyArg_ParseTuple(args, "OOO!O!", &cap, &chunks, &PyDict_Type, &tokens, &PyDict_Type, &spaced))
        return NULL;
    Tok *T = PyCapsule_GetPointer(cap, "spacy_en.Tok");
    return T ? fill(T, chunks, tokens, spaced) : NULL;
}

/* What ensure returns for the distinct chunks not in tokens (`fresh`): fill them in, unless they would
 * bring tokens to `limit` entries (then None, nothing added). */
static PyObject *fill_fresh(Tok *T, PyObject *fresh, PyObject *tokens, PyObject *spaced, Py_ssize_t limit) {
    if (PyList_GET_SIZE(fresh) == 0) return PyList_New(0);
    if (PyDict_GET_SIZE(tokens) + PyList_GET_SIZE(fresh) >= limit) Py_RETURN_NONE;
    return fill(T, fresh, tokens, spaced);
}

/* ensure(capsule, chunks, tokens, spaced, limit) -> the chunks where a search gave up, or None (and
 * nothing added) when the distinct chunks not in tokens would bring it to `limit` entries. The
 * iterable may repeat chunks (a document's split): looking each up here costs less than building a
 * set of them and its difference with the cache. */
static PyObject *py_ensure(PyObject *self, PyObject *args) {
    PyObject *cap, *chunks, *tokens, *spaced;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "OOO!O!n", &cap, &chunks, &PyDict_Type, &tokens, &PyDict_Type, &spaced, &limit))
        return NULL;
    Tok *T = PyCapsule_GetPointer(cap, "spacy_en.Tok");
    if (!T) return NULL;
    /* A document repeats chunks: each distinct one is looked up in the (large, cache-missing) dict once,
     * after a probe of a small table of this call's chunks by their str hash. */
    PyObject *seq = PySequence_Fast(chunks, "chunks must be iterable"), *fresh = NULL, *out = NULL;
    PyObject **seen = NULL;
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), size = 16;
    while (size < 2 * n) size *= 2;
    seen = calloc(size, sizeof(PyObject *));
    fresh = PyList_New(0);
    if (!seen || !fresh) {
        if (!seen) PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *chunk = PySequence_Fast_GET_ITEM(seq, i);
        Py_hash_t h = PyObject_Hash(chunk);
        if (h == -1) goto done;
        Py_ssize_t j = (Py_ssize_t)((size_t)h & (size - 1));
        int dup = 0;
        for (; seen[j]; j = (j + 1) & (size - 1)) {
            int eq = PyObject_RichCompareBool(seen[j], chunk, Py_EQ);
            if (eq < 0) goto done;
            if (eq) {
                dup = 1;
                break;
            }
        }
        if (dup) continue;
        seen[j] = chunk;
        int rc = PyDict_Contains(tokens, chunk);
        if (rc == 0) rc = PyList_Append(fresh, chunk);
        if (rc < 0) goto done;
    }
    out = fill_fresh(T, fresh, tokens, spaced, limit);
done:
    free(seen);
    Py_XDECREF(fresh);
    Py_DECREF(seq);
    return out;
}

/* ensure_text(capsule, text, tokens, spaced, limit): ensure for the whitespace-separated chunks of text
 * (str.split()), which it finds itself: a str is made only for each distinct chunk of the text, not for
 * every repeat of it. */
static PyObject *py_ensure_text(PyObject *self, PyObject *args) {
    PyObject *cap, *text, *tokens, *spaced;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "OUO!O!n", &cap, &text, &PyDict_Type, &tokens, &PyDict_Type, &spaced, &limit) ||
        ready(text) < 0)
        return NULL;
    Tok *T = PyCapsule_GetPointer(cap, "spacy_en.Tok");
    if (!T) return NULL;
    Str s = {PyUnicode_DATA(text), PyUnicode_KIND(text), 0, PyUnicode_GET_LENGTH(text)};
    Spans chunks = {0};
    Py_ssize_t *seen = NULL, size = 16;
    uint64_t *hashes = NULL;
    PyObject *fresh = NULL, *out = NULL;
    for (Py_ssize_t i = 0; i < s.end;) {
        while (i < s.end && Py_UNICODE_ISSPACE(rd(&s, i))) i++;
        Py_ssize_t start = i;
        while (i < s.end && !Py_UNICODE_ISSPACE(rd(&s, i))) i++;
        if (i > start && spans_push(&chunks, start, i) < 0) {
            PyErr_NoMemory();
            goto done;
        }
    }
    while (size < 2 * chunks.n) size *= 2;
    seen = malloc(size * sizeof(Py_ssize_t));
    hashes = malloc(size * sizeof(uint64_t));
    fresh = PyList_New(0);
    if (!seen || !hashes || !fresh) {
        if (fresh) PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < size; j++) seen[j] = -1;
    for (Py_ssize_t c = 0; c < chunks.n; c++) {
        Py_ssize_t a = chunks.v[2 * c], b = chunks.v[2 * c + 1];
        uint64_t h = hash_str(&s, a, b);
        Py_ssize_t j = (Py_ssize_t)(h & (uint64_t)(size - 1));
        int dup = 0;
        for (; seen[j] >= 0; j = (j + 1) & (size - 1)) {
            Py_ssize_t a2 = chunks.v[2 * seen[j]], b2 = chunks.v[2 * seen[j] + 1], k = 0;
            if (hashes[j] != h || b2 - a2 != b - a) continue;
            while (k < b - a && rd(&s, a + k) == rd(&s, a2 + k)) k++;
            if (k == b - a) {
                dup = 1;
                break;
            }
        }
        if (dup) continue;
        seen[j] = c;
        hashes[j] = h;
        PyObject *chunk = PyUnicode_Substring(text, a, b);
        if (!chunk) goto done;
        int rc = PyDict_Contains(tokens, chunk);
        if (rc == 0) rc = PyList_Append(fresh, chunk);
        Py_DECREF(chunk);
        if (rc < 0) goto done;
    }
    out = fill_fresh(T, fresh, tokens, spaced, limit);
done:
    free(chunks.v);
    free(seen);
    free(hashes);
    Py_XDECREF(fresh);
    return out;
}

/* search(prog, s, pos, endpos) -> (start, end) or None: pattern.search(s, pos, endpos), for tests. */
static PyObject *py_search(PyObject *self, PyObject *args) {
    PyObject *t, *str;
    Py_ssize_t pos, endpos;
    if (!PyArg_ParseTuple(args, "OUnn", &t, &str, &pos, &endpos) || ready(str) < 0) return NULL;
    Prog p;
    if (matcher_prog_load(&p, t) < 0) return NULL;
    Ctx cx = {0};
    Str s = {PyUnicode_DATA(str), PyUnicode_KIND(str), 0, endpos};
    Py_ssize_t ms, me = matcher_search(&cx, &p, &s, pos, 0, &ms);
    matcher_prog_free(&p);
    free(cx.st);
    if (me < -1) {
        PyErr_SetString(PyExc_RuntimeError, "spacy_en: step limit or out of memory");
        return NULL;
    }
    if (me < 0) Py_RETURN_NONE;
    return Py_BuildValue("nn", ms, me);
}

/* finditer(prog, s) -> [(start, end), ...]: the spans of pattern.finditer(s), for tests. */
static PyObject *py_finditer(PyObject *self, PyObject *args) {
    PyObject *t, *str;
    if (!PyArg_ParseTuple(args, "OU", &t, &str) || ready(str) < 0) return NULL;
    Prog p;
    if (matcher_prog_load(&p, t) < 0) return NULL;
    Ctx cx = {0};
    Str s = {PyUnicode_DATA(str), PyUnicode_KIND(str), 0, PyUnicode_GET_LENGTH(str)};
    PyObject *out = PyList_New(0);
    Py_ssize_t from = 0, ms, me;
    int must_advance = 0;
    while (out && from <= s.end) {
        me = matcher_search(&cx, &p, &s, from, must_advance, &ms);
        if (me == -1) break;
        if (me < -1) {
            PyErr_SetString(PyExc_RuntimeError, "spacy_en: step limit or out of memory");
            Py_CLEAR(out);
            break;
        }
        PyObject *span = Py_BuildValue("nn", ms, me);
        if (!span || PyList_Append(out, span) < 0) Py_CLEAR(out);
        Py_XDECREF(span);
        must_advance = me == ms;
        from = me;
    }
    matcher_prog_free(&p);
    free(cx.st);
    return out;
}

static PyMethodDef methods[] = {
    {"build", py_build, METH_VARARGS, "Build a tokenizer from compiled programs and special cases."},
    {"tokenize", py_tokenize, METH_VARARGS, "Tokens of each chunk (None where a search gave up)."},
    {"tokenize_into", py_tokenize_into, METH_VARARGS, "Tokens of chunks into two dicts; returns the rest."},
    {"ensure", py_ensure, METH_VARARGS, "tokenize_into for the chunks not in the dict, under a size limit."},
    {"ensure_text", py_ensure_text, METH_VARARGS, "ensure for the whitespace-separated chunks of a text."},
    {"search", py_search, METH_VARARGS, "A program's pattern.search(s, pos, endpos) span (tests)."},
    {"finditer", py_finditer, METH_VARARGS, "A program's pattern.finditer(s) spans (tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_spacy_en", NULL, -1, methods};

PyMODINIT_FUNC PyInit__spacy_en(void) { return PyModule_Create(&module); }
