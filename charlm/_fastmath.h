/* Single-precision exp, sigmoid and tanh that the compiler can vectorise.
 *
 * libm's expf and tanhf are function calls, so a loop over gate units that
 * uses them runs one element at a time; in the LSTM and GRU kernels that
 * element-wise part cost several times the recurrent GEMM. These versions
 * are branch-free inline arithmetic (a select at most), so gcc -O3 turns the
 * loops into SIMD code at the machine's full width, without -ffast-math.
 *
 * Accuracy (float32): exp within 2 ulp on [-87, 88]; sigmoid within a few
 * ulp; tanh within 2e-7 absolute everywhere and a few ulp relative. NaN in
 * gives NaN out, so a poisoned weight is never laundered into a finite loss.
 * The float64 kernels keep libm: they exist for gradient checks.
 */
#ifndef CHARLM_FASTMATH_H
#define CHARLM_FASTMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2)/2.
 * ln 2 is split in two parts (the first exact in few bits) so that
 * x - n*ln2 loses nothing; exp(r) is its Taylor series to r^7, whose
 * remainder on |r| <= 0.347 is below 6e-9, under half an ulp. */
static inline float charlm_expf(float x)
{
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f;          /* 8 significant bits: n*ln2_hi is exact */
    const float ln2_lo = -2.12194440e-4f;
    const float round_magic = 12582912.0f;      /* 1.5 * 2^23: adding it rounds to an integer */
    float n, r, p, scale;
    int32_t bits;

    /* Keep 2^n a normal float. Written as comparisons, not fminf/fmaxf,
     * so that NaN passes through unchanged. */
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    n = (x * log2e + round_magic) - round_magic;
    r = x - n * ln2_hi;
    r = r - n * ln2_lo;
    p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    bits = ((int32_t)n + 127) << 23;            /* the float 2^n */
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float charlm_sigmoidf(float x)
{
    return 1.0f / (1.0f + charlm_expf(-x));
}

/* tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|). Near 0 the
 * subtraction 1 - e cancels, so |x| < 1/8 uses the odd Taylor series
 * x - x^3/3 + 2x^5/15 - 17x^7/315 (next term below 2e-9 relative). */
static inline float charlm_tanhf(float x)
{
    float a = x < 0 ? -x : x;
    float e = charlm_expf(-2.0f * a);
    float t = (1.0f - e) / (1.0f + e);
    float x2 = x * x;
    float s = x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
    t = x < 0 ? -t : t;
    return a < 0.125f ? s : t;
}

/* The float64 kernels' sigmoid, on libm's exp: float64 is for gradient
 * checks, where accuracy matters and speed does not. */
static inline double charlm_sigmoid_d(double x)
{
    return 1 / (1 + exp(-x));
}

#endif
