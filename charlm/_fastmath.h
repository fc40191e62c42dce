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
 * remainder on |r| <= 0.347 is below 6e-9, under half an ulp.
 *
 * charlm_exp_split returns 2^n and r; charlm_exp_series gives s(r) with
 * exp(r) = 1 + r s(r). The caller keeps 2^n a normal float by clamping x
 * to [-87.3, 88.3], written as comparisons, not fminf/fmaxf, so that NaN
 * passes through unchanged; where x cannot exceed 88.3 (the sigmoid's and
 * tanh's arguments below) only the lower clamp is paid for. */
static inline float charlm_exp_split(float x, float* r)
{
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f;          /* 8 significant bits: n*ln2_hi is exact */
    const float ln2_lo = -2.12194440e-4f;
    const float round_magic = 12582912.0f;      /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * log2e + round_magic) - round_magic;
    float scale;
    int32_t bits = ((int32_t)n + 127) << 23;    /* the float 2^n */
    memcpy(&scale, &bits, sizeof scale);
    *r = (x - n * ln2_hi) - n * ln2_lo;
    return scale;
}

static inline float charlm_exp_series(float r)
{
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    return p * r + 1.0f;
}

/* exp(x) for x <= 88.3 (or NaN). */
static inline float charlm_expf_at_most_88(float x)
{
    float r, scale;
    x = x < -87.3f ? -87.3f : x;
    scale = charlm_exp_split(x, &r);
    return (charlm_exp_series(r) * r + 1.0f) * scale;
}

static inline float charlm_expf(float x)
{
    return charlm_expf_at_most_88(x > 88.3f ? 88.3f : x);
}

/* exp(x) - 1 for x <= 0 (or NaN): 2^n (exp(r) - 1) + (2^n - 1), with
 * exp(r) - 1 = r s(r) summed as such, so that near 0 (n = 0) nothing
 * cancels: within a few ulp of the exact value everywhere. */
static inline float charlm_expm1f_at_most_0(float x)
{
    float r, scale;
    x = x < -87.3f ? -87.3f : x;
    scale = charlm_exp_split(x, &r);
    return scale * (charlm_exp_series(r) * r) + (scale - 1.0f);
}

static inline float charlm_sigmoidf(float x)
{
    return 1.0f / (1.0f + charlm_expf(-x));
}

/* tanh(x) = sign(x) (-m) / (2 + m), m = expm1(-2|x|) in (-1, 0]: the
 * numerator is returned, the denominator (in (1, 2]) stored. On expm1, not
 * exp: (1 - e) / (1 + e) with e = exp(-2|x|) cancels near 0, and needed
 * the odd Taylor series there, a second polynomial and a select per tanh;
 * the LSTM's forward units took 2.74 ns per unit with it, 2.01 without
 * (one core of an Intel Xeon, 25 x 128 units a step). */
static inline float charlm_tanh_parts(float x, float* denominator)
{
    float a = x < 0 ? -x : x;
    float m = charlm_expm1f_at_most_0(-2.0f * a);
    *denominator = 2.0f + m;
    return x < 0 ? m : -m;
}

static inline float charlm_tanhf(float x)
{
    float denominator, numerator = charlm_tanh_parts(x, &denominator);
    return numerator / denominator;
}

/* The float64 kernels' sigmoid, on libm's exp: float64 is for gradient
 * checks, where accuracy matters and speed does not. */
static inline double charlm_sigmoid_d(double x)
{
    return 1 / (1 + exp(-x));
}

/* Several activations for the price of one division.
 *
 * A vector division is the slowest arithmetic there is (on an Intel Xeon,
 * one 16-wide vdivps per 8-10 cycles; the exp beside it is a few FMAs), and
 * the LSTM's units did five per unit: 6.3 ns per unit against 2.9 with the
 * two below (one step of 25 x 128 units, one core of an Intel Xeon).
 * sigmoid(x) = 1/d with d = 1 + exp(-x), and tanh(x) = sign(x) (1-e)/d with
 * d = 1 + e, e = exp(-2|x|): with r = 1/(d_1 d_2 d_3), each 1/d_k is r times
 * the other two. Each result is within a few ulp of the separate divisions.
 * So that the product cannot overflow, sigmoid's argument is raised to -40
 * at least (d <= 2.4e17; tanh's d is in (1, 2]): sigmoid(x) for x < -40 is
 * then 4.2e-18 instead of less, an absolute difference of no consequence
 * beside float32's 6e-8 resolution near 1. NaN still gives NaN. */
static inline float charlm_sigmoid_denominator(float x)
{
    x = x < -40.0f ? -40.0f : x;               /* NaN passes unchanged */
    return 1.0f + charlm_expf_at_most_88(-x);
}

/* i = sigmoid(a_i), f = sigmoid(a_f), g = tanh(a_g): one division. */
static inline void charlm_sigmoid2_tanh_f(float a_i, float a_f, float a_g,
                                          float* i, float* f, float* g)
{
    float d_i = charlm_sigmoid_denominator(a_i);
    float d_f = charlm_sigmoid_denominator(a_f);
    float d_g, n_g = charlm_tanh_parts(a_g, &d_g);
    float r = 1.0f / (d_i * d_f * d_g);
    *i = r * (d_f * d_g);
    *f = r * (d_i * d_g);
    *g = n_g * (r * (d_i * d_f));
}

/* o = sigmoid(a_o), t = tanh(x): one division. */
static inline void charlm_sigmoid_tanh_f(float a_o, float x, float* o, float* t)
{
    float d_o = charlm_sigmoid_denominator(a_o);
    float d_t, n_t = charlm_tanh_parts(x, &d_t);
    float r = 1.0f / (d_o * d_t);
    *o = r * d_t;
    *t = n_t * (r * d_o);
}

/* r = sigmoid(a_r), z = sigmoid(a_z): one division. */
static inline void charlm_sigmoid2_f(float a_r, float a_z, float* r, float* z)
{
    float d_r = charlm_sigmoid_denominator(a_r);
    float d_z = charlm_sigmoid_denominator(a_z);
    float q = 1.0f / (d_r * d_z);
    *r = q * d_z;
    *z = q * d_r;
}

/* The float64 versions, one libm call per activation. */
static inline void charlm_sigmoid2_tanh_d(double a_i, double a_f, double a_g,
                                          double* i, double* f, double* g)
{
    *i = charlm_sigmoid_d(a_i);
    *f = charlm_sigmoid_d(a_f);
    *g = tanh(a_g);
}

static inline void charlm_sigmoid_tanh_d(double a_o, double x, double* o, double* t)
{
    *o = charlm_sigmoid_d(a_o);
    *t = tanh(x);
}

static inline void charlm_sigmoid2_d(double a_r, double a_z, double* r, double* z)
{
    *r = charlm_sigmoid_d(a_r);
    *z = charlm_sigmoid_d(a_z);
}

#endif
