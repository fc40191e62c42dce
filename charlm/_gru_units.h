/* The GRU's element-wise equations for one stream and one time step,
 * forward and backward side by side (the products with W_hh are done
 * before/after them by charlm/_kernels.pyx).
 *
 * Gates are stacked [r | z | n], H units each. a_* = W_i* x + b_i* comes
 * from the input projection, hh_* = W_h* h_{t-1} + b_h* from the recurrent
 * product (b_hn must sit inside the product with r, so b_hh is not folded):
 *
 *   r = sigmoid(a_r + hh_r)        z = sigmoid(a_z + hh_z)
 *   n = tanh(a_n + r hh_n)         h_t = (1 - z) n + z h_{t-1}
 *
 * Why C and not Cython: as for the LSTM (_lstm_units.h), one loop iteration
 * per unit reads every input once and keeps the intermediates in registers,
 * and only C's `restrict` lets gcc vectorise such a loop. Written in Cython,
 * as one loop per equation, the loops that index a gate block as hh[H + j]
 * stayed scalar (under Python's -fwrapv the int sum may wrap, so gcc cannot
 * prove the accesses consecutive), and a sampling step spent a quarter of
 * its time here. The operations and their order are those of the equations
 * above, so results do not depend on the vector width.
 */
#ifndef CHARLM_GRU_UNITS_H
#define CHARLM_GRU_UNITS_H

#include <math.h>
#include <stddef.h>
#include "_fastmath.h"

#define CHARLM_DEFINE_GRU_UNITS(SUFFIX, REAL, SIGMOID2, TANH)                    \
                                                                                  \
/* Forward. gate (3H): in a_r, a_z, a_n; out the activated r, z, n.              \
 * hh (3H): hh_r, hh_z, hh_n. Writes h = h_t. h may be h_prev (the sampler       \
 * updates its state in place); nothing else may overlap. */                      \
static inline void charlm_gru_forward_units_##SUFFIX(                            \
    int H, REAL* restrict gate, const REAL* restrict hh, const REAL* h_prev,     \
    REAL* h)                                                                      \
{                                                                                 \
    /* one pointer per block, indexed by j alone (see the note on -fwrapv) */    \
    REAL* restrict g_r = gate;                                                    \
    REAL* restrict g_z = gate + H;                                                \
    REAL* restrict g_n = gate + 2 * (size_t)H;                                    \
    const REAL* restrict hh_r = hh;                                               \
    const REAL* restrict hh_z = hh + H;                                           \
    const REAL* restrict hh_n = hh + 2 * (size_t)H;                               \
    for (int j = 0; j < H; j++) {                                                 \
        REAL r, z;                                                                \
        SIGMOID2(g_r[j] + hh_r[j], g_z[j] + hh_z[j], &r, &z);   /* one division */ \
        REAL n = TANH(g_n[j] + r * hh_n[j]);                                      \
        REAL h_t = (1 - z) * n + z * h_prev[j];                                   \
        g_r[j] = r;                                                               \
        g_z[j] = z;                                                               \
        g_n[j] = n;                                                               \
        h[j] = h_t;                                                               \
    }                                                                             \
}                                                                                 \
                                                                                  \
/* Backward. gate (3H): the activated r, z, n; hh_n (H): W_hn h_{t-1} + b_hn     \
 * as the forward saw it; h_prev (H): h_{t-1}. dh (H): in dL/dh_t from step      \
 * t+1, to which dh_up (H, from the layer above or the output) is added; out,    \
 * the direct part of dL/dh_{t-1} (through z h_{t-1}; the product with W_hh     \
 * adds the rest). Writes dx (3H), dL/d(a_r, a_z, a_n), and dhh (3H),            \
 * dL/d(hh_r, hh_z, hh_n): the same but for n, which sees hh_n through r. */     \
static inline void charlm_gru_backward_units_##SUFFIX(                           \
    int H, const REAL* restrict gate, const REAL* restrict hh_n,                 \
    const REAL* restrict h_prev, const REAL* restrict dh_up, REAL* restrict dh,  \
    REAL* restrict dx, REAL* restrict dhh)                                       \
{                                                                                 \
    const REAL* restrict g_r = gate;                                              \
    const REAL* restrict g_z = gate + H;                                          \
    const REAL* restrict g_n = gate + 2 * (size_t)H;                              \
    REAL* restrict dx_r = dx;                                                     \
    REAL* restrict dx_z = dx + H;                                                 \
    REAL* restrict dx_n = dx + 2 * (size_t)H;                                     \
    REAL* restrict dhh_r = dhh;                                                   \
    REAL* restrict dhh_z = dhh + H;                                               \
    REAL* restrict dhh_n = dhh + 2 * (size_t)H;                                   \
    for (int j = 0; j < H; j++) {                                                 \
        REAL r = g_r[j], z = g_z[j], n = g_n[j];                                  \
        REAL d_h = dh[j] + dh_up[j];                                              \
        /* h_t = (1 - z) n + z h_{t-1} */                                         \
        REAL d_n = d_h * (1 - z) * (1 - n * n);                                   \
        REAL d_z = d_h * (h_prev[j] - n) * z * (1 - z);                           \
        /* n = tanh(a_n + r hh_n) */                                              \
        REAL d_r = d_n * hh_n[j] * r * (1 - r);                                   \
        dx_r[j] = d_r;                                                            \
        dx_z[j] = d_z;                                                            \
        dx_n[j] = d_n;                                                            \
        dhh_r[j] = d_r;                                                           \
        dhh_z[j] = d_z;                                                           \
        dhh_n[j] = d_n * r;                                                       \
        dh[j] = d_h * z;                                                          \
    }                                                                             \
}

CHARLM_DEFINE_GRU_UNITS(f, float, charlm_sigmoid2_f, charlm_tanhf)
CHARLM_DEFINE_GRU_UNITS(d, double, charlm_sigmoid2_d, tanh)

#endif
