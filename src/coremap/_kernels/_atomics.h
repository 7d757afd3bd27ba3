/* Sequentially consistent atomics for the chunk runner (GCC/Clang builtins).
 * Written by hand because Cython has no portable atomic type; these are the
 * same builtins that C11 <stdatomic.h> lowers to. */
#ifndef COREMAP_ATOMICS_H
#define COREMAP_ATOMICS_H
#include <stdint.h>

static inline int64_t cm_load(int64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void cm_store(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline int64_t cm_fetch_add(int64_t *p, int64_t v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
static inline int cm_cas(int64_t *p, int64_t *expected, int64_t desired) {
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
#endif
