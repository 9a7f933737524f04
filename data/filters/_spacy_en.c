/* spaCy's English tokenizer per whitespace-free chunk, in C: a backtracking matcher for the programs
 * data/filters/spacy_en.py compiles from spaCy's prefix, suffix, infix and URL patterns (Python `re`
 * semantics), and a port of spacy/tokenizer.pyx (3.8): _split_affixes, _attach_tokens and
 * _apply_special_cases. Strings are read in place from their PyUnicode buffers (1, 2 or 4 bytes a code
 * point; lone surrogates are code points like others). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { OP_CHAR, OP_SET, OP_ANY, OP_JMP, OP_SPLIT, OP_BRANCH, OP_AT, OP_ASSERT, OP_MATCH };

/* A search that runs more steps than this gives up, and the caller asks spaCy (re has no limit; a
 * pathological chunk must not hang here nor come out different). */
#define STEP_LIMIT (1L << 22)
#define GAVE_UP (-2)

typedef struct {
    Py_ssize_t n; /* number of ranges */
    Py_UCS4 *r;   /* lo, hi pairs, sorted, inclusive */
    uint8_t latin[32];
    uint8_t *bmp; /* a bit per code point below 0x10000, for the sets a search tests at every position */
} Set;

typedef struct {
    int *code;
    int *tabs;
    Set *sets;
    Py_ssize_t nsets;
    int first; /* set every match starts with, or -1 */
    int anchored;
    int tail, far; /* see _tail in spacy_en.py: further than tail + 1 from the end, only set far can start */
} Prog;

typedef struct {
    const void *data;
    int kind;
    Py_ssize_t begin, end; /* the string the pattern sees: data[begin:end] */
} Str;

typedef struct {
    int pc, k;
    Py_ssize_t pos;
} Frame;

typedef struct {
    Frame *st;
    Py_ssize_t n, cap;
    long steps;
} Ctx;

static inline Py_UCS4 rd(const Str *s, Py_ssize_t i) { return PyUnicode_READ(s->kind, s->data, i); }

static inline int in_set(const Set *set, Py_UCS4 ch) {
    if (ch < 256) return (set->latin[ch >> 3] >> (ch & 7)) & 1;
    if (set->bmp && ch < 0x10000) return (set->bmp[ch >> 3] >> (ch & 7)) & 1;
    Py_ssize_t lo = 0, hi = set->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (set->r[2 * mid + 1] < ch)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < set->n && set->r[2 * lo] <= ch;
}

static int push(Ctx *cx, int pc, int k, Py_ssize_t pos) {
    if (cx->n == cx->cap) {
        Py_ssize_t cap = cx->cap ? 2 * cx->cap : 256;
        Frame *st = realloc(cx->st, cap * sizeof(Frame));
        if (!st) return -1;
        cx->st = st;
        cx->cap = cap;
    }
    cx->st[cx->n].pc = pc;
    cx->st[cx->n].k = k;
    cx->st[cx->n].pos = pos;
    cx->n++;
    return 0;
}

/* re's \w for str patterns: str.isalnum() or "_" (the word boundary reads it). */
static inline int is_word(Py_UCS4 ch) { return ch == '_' || Py_UNICODE_ISALNUM(ch); }

static int at_ok(int kind, const Str *s, Py_ssize_t pos) {
    switch (kind) {
    case 0: /* ^ without MULTILINE */
    case 2: /* \A */
        return pos == s->begin;
    case 1: /* $: the end, or before a final newline */
        return pos == s->end || (pos == s->end - 1 && rd(s, pos) == '\n');
    case 3: /* \Z */
        return pos == s->end;
    case 4:
    case 5: {
        int before = pos > s->begin && is_word(rd(s, pos - 1));
        int after = pos < s->end && is_word(rd(s, pos));
        if (s->begin == s->end) return 0; /* re: no boundary in an empty string */
        return (before != after) == (kind == 4);
    }
    }
    return 0;
}

/* The candidate alternatives of a branch at pos: entries of 4 ints (see branch in spacy_en.py). */
static inline const int *branch_list(const Prog *p, const int *tab, const Str *s, Py_ssize_t pos,
                                     const int **stop) {
    int nalt = tab[0];
    const int *offs = tab + 1 + nalt;
    int li;
    if (pos >= s->end)
        li = 257;
    else {
        Py_UCS4 ch = rd(s, pos);
        li = ch < 256 ? (int)ch : 256;
    }
    *stop = p->tabs + offs[li + 1];
    return p->tabs + offs[li];
}

/* The first candidate of a branch list from index k whose checks pass at pos (see branch in
 * spacy_en.py), or -1. */
static inline int next_candidate(const Prog *p, const Str *s, Py_ssize_t pos, const int *lst, int k,
                                 Py_ssize_t count) {
    Py_UCS4 ch = pos < s->end ? rd(s, pos) : 0;
    for (; k < count; k++) {
        const int *e = lst + 4 * k;
        if (e[1] >= 0 && !in_set(&p->sets[e[1]], ch)) continue;
        if (e[2] >= 0 && (pos <= s->begin || !in_set(&p->sets[e[2]], rd(s, pos - 1)))) continue;
        if (e[3] >= 0 && s->end - pos > e[3] + 1) continue;
        return k;
    }
    return -1;
}

/* Match the program from pc at pos: the end of the first match in re's order, -1 for none, GAVE_UP.
 * reject_at: a match ending there is refused (finditer after an empty match: the next one must not be
 * empty at the same place). */
static Py_ssize_t run(Ctx *cx, const Prog *p, const Str *s, int pc, Py_ssize_t pos, Py_ssize_t reject_at) {
    Py_ssize_t base = cx->n;
    const int *lst, *stop;
    int k;
    for (;;) {
        if (++cx->steps > STEP_LIMIT) {
            cx->n = base;
            return GAVE_UP;
        }
        const int *c = p->code + pc;
        switch (c[0]) {
        case OP_CHAR:
            if (pos < s->end && rd(s, pos) == (Py_UCS4)c[1]) {
                pos++;
                pc += 2;
                continue;
            }
            goto fail;
        case OP_SET:
            if (pos < s->end && in_set(&p->sets[c[1]], rd(s, pos))) {
                pos++;
                pc += 2;
                continue;
            }
            goto fail;
        case OP_ANY:
            if (pos < s->end && rd(s, pos) != '\n') {
                pos++;
                pc += 1;
                continue;
            }
            goto fail;
        case OP_JMP:
            pc = c[1];
            continue;
        case OP_SPLIT:
            if (push(cx, c[2], -1, pos) < 0) goto nomem;
            pc = c[1];
            continue;
        case OP_BRANCH:
            k = 0;
            goto branch;
        case OP_AT:
            if (at_ok(c[1], s, pos)) {
                pc += 2;
                continue;
            }
            goto fail;
        case OP_ASSERT: {
            int kind = c[1], width = c[2];
            Py_ssize_t r;
            if (kind >= 2)
                r = pos - width < s->begin ? -1 : run(cx, p, s, c[3], pos - width, -1);
            else
                r = run(cx, p, s, c[3], pos, -1);
            if (r == GAVE_UP || r == -3) {
                cx->n = base;
                return r;
            }
            if ((r >= 0) != (kind & 1)) {
                pc += 4;
                continue;
            }
            goto fail;
        }
        case OP_MATCH:
            if (pos == reject_at) goto fail;
            cx->n = base;
            return pos;
        default:
            cx->n = base;
            return -3;
        }
    branch: {
        const int *tab = p->tabs + c[1];
        lst = branch_list(p, tab, s, pos, &stop);
        Py_ssize_t count = (stop - lst) / 4;
        k = next_candidate(p, s, pos, lst, k, count);
        if (k < 0) goto fail;
        int again = next_candidate(p, s, pos, lst, k + 1, count);
        if (again >= 0 && push(cx, pc, again, pos) < 0) goto nomem;
        pc = tab[1 + lst[4 * k]];
        continue;
    }
    fail:
        if (cx->n == base) return -1;
        cx->n--;
        pc = cx->st[cx->n].pc;
        pos = cx->st[cx->n].pos;
        k = cx->st[cx->n].k;
        if (k >= 0) {
            c = p->code + pc;
            goto branch;
        }
        continue;
    nomem:
        cx->n = base;
        return -3;
    }
}

/* re's search from `from` on s: sets *mstart and returns the match end, -1 for none, GAVE_UP, -3. */
static Py_ssize_t search(Ctx *cx, const Prog *p, const Str *s, Py_ssize_t from, int must_advance,
                         Py_ssize_t *mstart) {
    cx->steps = 0;
    const Set *first = p->first >= 0 ? &p->sets[p->first] : NULL;
    const Set *far = p->tail >= 0 ? &p->sets[p->far] : NULL;
    for (Py_ssize_t st = from; st <= s->end; st++) {
        if (p->anchored && st != s->begin) break;
        if (far && s->end - st > p->tail + 1) {
            if (!in_set(far, rd(s, st))) continue;
        } else if (first) {
            if (st == s->end) break;
            if (!in_set(first, rd(s, st))) continue;
        }
        Py_ssize_t r = run(cx, p, s, 0, st, must_advance ? from : -1);
        if (r >= 0) {
            *mstart = st;
            return r;
        }
        if (r != -1) return r;
    }
    return -1;
}

/* ---- programs from Python: (code, sets, tabs, first, anchored, tail, far) ---- */

static int *int_array(PyObject *obj, Py_ssize_t *len) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (view.itemsize != sizeof(int) || !view.format || strcmp(view.format, "i") != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "expected array('i')");
        return NULL;
    }
    Py_ssize_t n = view.len / (Py_ssize_t)sizeof(int);
    int *out = malloc((n ? n : 1) * sizeof(int));
    if (!out) {
        PyBuffer_Release(&view);
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(out, view.buf, n * sizeof(int));
    PyBuffer_Release(&view);
    if (len) *len = n;
    return out;
}

static void prog_free(Prog *p) {
    if (!p) return;
    free(p->code);
    free(p->tabs);
    if (p->sets)
        for (Py_ssize_t i = 0; i < p->nsets; i++) {
            free(p->sets[i].r);
            free(p->sets[i].bmp);
        }
    free(p->sets);
    memset(p, 0, sizeof(*p));
}

static int prog_load(Prog *p, PyObject *t) {
    memset(p, 0, sizeof(*p));
    PyObject *code, *sets, *tabs;
    if (!PyArg_ParseTuple(t, "OOOipii", &code, &sets, &tabs, &p->first, &p->anchored, &p->tail, &p->far))
        return -1;
    if (!(p->code = int_array(code, NULL)) || !(p->tabs = int_array(tabs, NULL))) goto err;
    PyObject *seq = PySequence_Fast(sets, "sets must be a sequence");
    if (!seq) goto err;
    p->nsets = PySequence_Fast_GET_SIZE(seq);
    p->sets = calloc(p->nsets ? p->nsets : 1, sizeof(Set));
    if (!p->sets) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        goto err;
    }
    for (Py_ssize_t i = 0; i < p->nsets; i++) {
        Py_ssize_t n;
        int *r = int_array(PySequence_Fast_GET_ITEM(seq, i), &n);
        if (!r) {
            Py_DECREF(seq);
            goto err;
        }
        Set *set = &p->sets[i];
        set->n = n / 2;
        set->r = (Py_UCS4 *)r; /* code points are < 2**21: the same bits as int */
        for (Py_ssize_t j = 0; j < set->n; j++)
            for (Py_UCS4 ch = set->r[2 * j]; ch <= set->r[2 * j + 1] && ch < 256; ch++)
                set->latin[ch >> 3] |= (uint8_t)(1 << (ch & 7));
    }
    Py_DECREF(seq);
    int tested[2] = {p->first, p->tail >= 0 ? p->far : -1};
    for (int t = 0; t < 2; t++) {
        if (tested[t] < 0 || tested[t] >= p->nsets || p->sets[tested[t]].bmp) continue;
        Set *set = &p->sets[tested[t]];
        if (!(set->bmp = calloc(0x10000 / 8, 1))) {
            PyErr_NoMemory();
            goto err;
        }
        for (Py_ssize_t j = 0; j < set->n; j++)
            for (Py_UCS4 ch = set->r[2 * j]; ch <= set->r[2 * j + 1] && ch < 0x10000; ch++)
                set->bmp[ch >> 3] |= (uint8_t)(1 << (ch & 7));
    }
    return 0;
err:
    prog_free(p);
    return -1;
}

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
    Py_ssize_t ms, me = search(&T->cx, p, &s, a, 0, &ms);
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
                Py_ssize_t r = run(&T->cx, &T->url, &s, 0, a, -1);
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
                me = search(&T->cx, &T->infix, &s, from, must_advance, &ms);
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
    prog_free(&T->prefix);
    prog_free(&T->suffix);
    prog_free(&T->infix);
    prog_free(&T->url);
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
        int rc = t ? prog_load(dst[i], t) : -1;
        Py_XDECREF(t);
        if (rc < 0) goto err;
    }
    if (url != Py_None) {
        if (prog_load(&T->url, url) < 0) goto err;
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
    if (PyList_GET_SIZE(fresh) == 0) {
        out = PyList_New(0);
    } else if (PyDict_GET_SIZE(tokens) + PyList_GET_SIZE(fresh) >= limit) {
        Py_INCREF(Py_None);
        out = Py_None;
    } else {
        out = fill(T, fresh, tokens, spaced);
    }
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
    if (PyList_GET_SIZE(fresh) == 0) {
        out = PyList_New(0);
    } else if (PyDict_GET_SIZE(tokens) + PyList_GET_SIZE(fresh) >= limit) {
        Py_INCREF(Py_None);
        out = Py_None;
    } else {
        out = fill(T, fresh, tokens, spaced);
    }
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
    if (prog_load(&p, t) < 0) return NULL;
    Ctx cx = {0};
    Str s = {PyUnicode_DATA(str), PyUnicode_KIND(str), 0, endpos};
    Py_ssize_t ms, me = search(&cx, &p, &s, pos, 0, &ms);
    prog_free(&p);
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
    if (prog_load(&p, t) < 0) return NULL;
    Ctx cx = {0};
    Str s = {PyUnicode_DATA(str), PyUnicode_KIND(str), 0, PyUnicode_GET_LENGTH(str)};
    PyObject *out = PyList_New(0);
    Py_ssize_t from = 0, ms, me;
    int must_advance = 0;
    while (out && from <= s.end) {
        me = search(&cx, &p, &s, from, must_advance, &ms);
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
    prog_free(&p);
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
