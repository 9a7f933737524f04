/* The backtracking matcher of data/filters/_matcher.c (Python `re` semantics, for the programs
 * data/filters/spacy_en.py compiles): its types, the helper both files read strings with, and the
 * functions spaCy's tokenizer in data/filters/_spacy_en.c calls. Both files build the one extension module
 * data.filters._spacy_en (pyproject.toml). */
#ifndef KILN_MATCHER_H
#define KILN_MATCHER_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* Shared by the two files of one extension, not exported from it. */
#if defined(__GNUC__)
#define MATCHER_API __attribute__((visibility("hidden")))
#else
#define MATCHER_API
#endif

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

/* The entry points the tokenizer calls; what each returns is described at its definition. */
MATCHER_API Py_ssize_t matcher_run(Ctx *cx, const Prog *p, const Str *s, int pc, Py_ssize_t pos,
                                   Py_ssize_t reject_at);
MATCHER_API Py_ssize_t matcher_search(Ctx *cx, const Prog *p, const Str *s, Py_ssize_t from, int must_advance,
                                      Py_ssize_t *mstart);
MATCHER_API int matcher_prog_load(Prog *p, PyObject *t);
MATCHER_API void matcher_prog_free(Prog *p);

#endif
