/* The LSTM's element-wise equations for one stream and one time step,
 * forward and backward side by side (the products with W_hh are done
 * before/after them by charlm/_kernels.pyx).
 *
 * Gates are stacked [i | f | g | o], H units each. The peephole LSTM adds
 * per-unit weights peep = [w_ci | w_cf | w_co] (3H), NULL for the plain one:
 *
 *   i = sigmoid(a_i + w_ci c_{t-1})    f = sigmoid(a_f + w_cf c_{t-1})
 *   g = tanh(a_g)                      c_t = f c_{t-1} + i g
 *   o = sigmoid(a_o + w_co c_t)        h_t = o tanh(c_t)
 *
 * Why C and not Cython: each unit j is one loop iteration that reads all
 * four gates and writes everything, so the inputs are read once and the
 * intermediates stay in registers. For gcc to vectorise such a loop it must
 * know that the arrays do not overlap; only C's `restrict` can say so (in
 * Cython, one loop per equation was needed instead, and the intermediates
 * went through memory). The peephole terms are switched by a constant, so
 * that each variant is a loop without branches (gcc does not vectorise a
 * loop with an `if` on a pointer inside). The operations and their order
 * are those of the equations above, so results do not depend on the vector
 * width.
 */
#ifndef CHARLM_LSTM_UNITS_H
#define CHARLM_LSTM_UNITS_H

#include <math.h>
#include <stddef.h>
#include "_fastmath.h"

#define CHARLM_DEFINE_LSTM_UNITS(SUFFIX, REAL, SIGMOID2_TANH, SIGMOID_TANH)      \
                                                                                  \
/* Forward. gate (4H): in, the pre-activations; out, the activated i, f, g, o.   \
 * Writes c (= c_t), tanh_c and h (= h_t). c may be c_prev (the sampler          \
 * updates its state in place); nothing else may overlap. */                      \
static inline __attribute__((always_inline)) void                                \
charlm_lstm_forward_loop_##SUFFIX(                                                \
    int H, REAL* restrict gate, const REAL* c_prev, REAL* c,                      \
    REAL* restrict tanh_c, REAL* restrict h, const REAL* restrict peep,          \
    const int has_peep)                                                           \
{                                                                                 \
    /* one pointer per block, indexed by j alone: gcc cannot vectorise        \
     * gate[H + j] under Python's -fwrapv (the int sum may wrap) */            \
    REAL* restrict gi = gate;                                                     \
    REAL* restrict gf = gate + H;                                                 \
    REAL* restrict gg = gate + 2 * (size_t)H;                                     \
    REAL* restrict go = gate + 3 * (size_t)H;                                     \
    const REAL* restrict w_ci = peep;                                             \
    const REAL* restrict w_cf = has_peep ? peep + H : peep;                       \
    const REAL* restrict w_co = has_peep ? peep + 2 * (size_t)H : peep;           \
    for (int j = 0; j < H; j++) {                                                 \
        REAL cp = c_prev[j];                                                      \
        REAL a_i = gi[j], a_f = gf[j], a_o = go[j];                               \
        if (has_peep) {                                                           \
            a_i += w_ci[j] * cp;                                                  \
            a_f += w_cf[j] * cp;                                                  \
        }                                                                         \
        REAL i, f, g, o, tc;                                                      \
        SIGMOID2_TANH(a_i, a_f, gg[j], &i, &f, &g);     /* one division */         \
        REAL c_t = f * cp + i * g;                                                \
        if (has_peep)                                                             \
            a_o += w_co[j] * c_t;                                                 \
        SIGMOID_TANH(a_o, c_t, &o, &tc);                /* one division */         \
        gi[j] = i;                                                                \
        gf[j] = f;                                                                \
        gg[j] = g;                                                                \
        go[j] = o;                                                                \
        c[j] = c_t;                                                               \
        tanh_c[j] = tc;                                                           \
        h[j] = o * tc;                                                            \
    }                                                                             \
}                                                                                 \
                                                                                  \
static inline void charlm_lstm_forward_units_##SUFFIX(                            \
    int H, REAL* gate, const REAL* c_prev, REAL* c, REAL* tanh_c, REAL* h,       \
    const REAL* peep)                                                             \
{                                                                                 \
    if (peep)                                                                     \
        charlm_lstm_forward_loop_##SUFFIX(H, gate, c_prev, c, tanh_c, h, peep, 1);\
    else                                                                          \
        charlm_lstm_forward_loop_##SUFFIX(H, gate, c_prev, c, tanh_c, h, peep, 0);\
}                                                                                 \
                                                                                  \
/* Backward. gate (4H): in, the activated i, f, g, o of the forward; out,       \
 * dL/d their pre-activations (in place: the activations are not needed after   \
 * this, and one buffer instead of two keeps more of the chunk in cache).        \
 * c_prev, c_t, tanh_c (H): from the forward.                                    \
 * dL/dh_t = dh_next (from step t+1) + dh_up (from the layer or output above).   \
 * dc (H): in, dL/dc_t from step t+1; out, dL/dc_{t-1}.                          \
 * With peep, dpeep (3H) accumulates the peephole weights' gradients. */         \
static inline __attribute__((always_inline)) void                                \
charlm_lstm_backward_loop_##SUFFIX(                                               \
    int H, REAL* gate, const REAL* restrict c_prev,                               \
    const REAL* restrict c_t, const REAL* restrict tanh_c,                        \
    const REAL* restrict dh_next, const REAL* restrict dh_up,                     \
    REAL* restrict dc, const REAL* restrict peep, REAL* restrict dpeep,           \
    const int has_peep)                                                           \
{                                                                                 \
    /* Each block is read, then overwritten with its gradient, at the same j:   \
     * the four block pointers never overlap, so each may be restrict. */       \
    REAL* restrict gi = gate;                                                     \
    REAL* restrict gf = gate + H;                                                 \
    REAL* restrict gg = gate + 2 * (size_t)H;                                     \
    REAL* restrict go = gate + 3 * (size_t)H;                                     \
    const REAL* restrict w_ci = peep;                                             \
    const REAL* restrict w_cf = has_peep ? peep + H : peep;                       \
    const REAL* restrict w_co = has_peep ? peep + 2 * (size_t)H : peep;           \
    REAL* restrict dw_ci = dpeep;                                                 \
    REAL* restrict dw_cf = has_peep ? dpeep + H : dpeep;                          \
    REAL* restrict dw_co = has_peep ? dpeep + 2 * (size_t)H : dpeep;              \
    for (int j = 0; j < H; j++) {                                                 \
        REAL i = gi[j], f = gf[j], g = gg[j], o = go[j];                          \
        REAL tc = tanh_c[j], dh = dh_next[j] + dh_up[j];                          \
        /* h_t = o tanh(c_t): into o, and on into c_t */                          \
        REAL d_o = dh * tc * o * (1 - o);                                         \
        REAL d_c = dc[j] + dh * o * (1 - tc * tc);                                \
        if (has_peep)                                                             \
            d_c += d_o * w_co[j];               /* o saw c_t */                   \
        /* c_t = f c_{t-1} + i g */                                               \
        REAL d_i = d_c * g * i * (1 - i);                                         \
        REAL d_f = d_c * c_prev[j] * f * (1 - f);                                 \
        REAL d_g = d_c * i * (1 - g * g);                                         \
        REAL d_c_prev = d_c * f;                                                  \
        if (has_peep) {                         /* i and f saw c_{t-1} */          \
            d_c_prev += d_i * w_ci[j] + d_f * w_cf[j];                            \
            dw_ci[j] += d_i * c_prev[j];                                          \
            dw_cf[j] += d_f * c_prev[j];                                          \
            dw_co[j] += d_o * c_t[j];                                             \
        }                                                                         \
        gi[j] = d_i;                                                              \
        gf[j] = d_f;                                                              \
        gg[j] = d_g;                                                              \
        go[j] = d_o;                                                              \
        dc[j] = d_c_prev;                                                         \
    }                                                                             \
}                                                                                 \
                                                                                  \
static inline void charlm_lstm_backward_units_##SUFFIX(                           \
    int H, REAL* gate, const REAL* c_prev, const REAL* c_t,                      \
    const REAL* tanh_c, const REAL* dh_next, const REAL* dh_up, REAL* dc,        \
    const REAL* peep, REAL* dpeep)                                                \
{                                                                                 \
    if (peep)                                                                     \
        charlm_lstm_backward_loop_##SUFFIX(H, gate, c_prev, c_t, tanh_c, dh_next, \
                                           dh_up, dc, peep, dpeep, 1);            \
    else                                                                          \
        charlm_lstm_backward_loop_##SUFFIX(H, gate, c_prev, c_t, tanh_c, dh_next, \
                                           dh_up, dc, peep, dpeep, 0);            \
}

CHARLM_DEFINE_LSTM_UNITS(f, float, charlm_sigmoid2_tanh_f, charlm_sigmoid_tanh_f)
CHARLM_DEFINE_LSTM_UNITS(d, double, charlm_sigmoid2_tanh_d, charlm_sigmoid_tanh_d)

#endif
