/* A backtracking matcher for the programs data/filters/spacy_en.py compiles from spaCy's prefix, suffix,
 * infix and URL patterns (Python `re` semantics), and their loading from Python. Its types and entry
 * points are in data/filters/_matcher.h; spaCy's tokenizer on it is data/filters/_spacy_en.c (the same
 * extension module). Strings are read in place from their PyUnicode buffers (1, 2 or 4 bytes a code
 * point; lone surrogates are code points like others). */
#include "_matcher.h"

#include <stdlib.h>
#include <string.h>

enum { OP_CHAR, OP_SET, OP_ANY, OP_JMP, OP_SPLIT, OP_BRANCH, OP_AT, OP_ASSERT, OP_MATCH };

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
Py_ssize_t matcher_run(Ctx *cx, const Prog *p, const Str *s, int pc, Py_ssize_t pos, Py_ssize_t reject_at) {
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
                r = pos - width < s->begin ? -1 : matcher_run(cx, p, s, c[3], pos - width, -1);
            else
                r = matcher_run(cx, p, s, c[3], pos, -1);
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
Py_ssize_t matcher_search(Ctx *cx, const Prog *p, const Str *s, Py_ssize_t from, int must_advance,
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
        Py_ssize_t r = matcher_run(cx, p, s, 0, st, must_advance ? from : -1);
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

void matcher_prog_free(Prog *p) {
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

int matcher_prog_load(Prog *p, PyObject *t) {
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
    matcher_prog_free(p);
    return -1;
}
