/* The matrix products of a training step, on one core: OpenBLAS (the one
 * scipy ships, which charlm's kernels call), MKL (when given) and charlm's
 * own packed kernel (charlm/_packed_gemm.h). Built and run by bench_blas.py,
 * which passes the two libraries' paths and BLAS symbols.
 *
 * Row-major throughout, as charlm stores its arrays; the Fortran sgemm is
 * called on the transposes (C^T = B^T A^T), so no copy is timed. A
 * recurrent step's W_hh is packed once, as charlm packs it once per chunk;
 * a weight gradient packs its x at every product, as charlm does. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "_packed_gemm.h"

typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*,
                         const float*, const float*, const int*, const float*, const int*,
                         const float*, float*, const int*);

typedef struct {
    const char* name;
    int M, N, K;     /* C (M, N) = A (M, K) @ B (K, N) */
    int b_stored_nk; /* B is stored (N, K), as W_hh is for h @ W_hh.T */
    int transposed_a;/* A is stored (K, M): dW = dgates.T @ x */
    int reps;
} product;

static const product PRODUCTS[] = {
    {"LSTM 2x128 step: (25,128) @ W_hh.T (128,512)", 25, 512, 128, 1, 0, 4000},
    {"its backward: (25,512) @ W_hh (512,128)", 25, 128, 512, 0, 0, 4000},
    {"LSTM 2x512 step: (25,512) @ W_hh.T (512,2048)", 25, 2048, 512, 1, 0, 300},
    {"input projection: (1250,128) @ W_ih.T (128,512)", 1250, 512, 128, 1, 0, 100},
    {"span of dW: dgates.T (512,250) @ h (250,128)", 512, 128, 250, 0, 1, 500},
    {"span of dx: (250,512) @ W_ih (512,128)", 250, 128, 512, 0, 0, 500},
    {"output layer: (1250,128) @ W_out.T (128,65)", 1250, 65, 128, 1, 0, 400},
};
#define N_PRODUCTS (int)(sizeof PRODUCTS / sizeof PRODUCTS[0])
#define ROUNDS 9

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static float* filled(size_t n)
{
    float* p = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    for (size_t i = 0; i < n; i++)
        p[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
    return p;
}

static void blas_product(sgemm_fn sgemm, const product* p, const float* a, const float* b, float* c)
{
    const float one = 1, zero = 0;
    if (p->transposed_a) {      /* C^T (N, M) = B^T @ A, A stored (K, M) */
        sgemm("N", "T", &p->N, &p->M, &p->K, &one, b, &p->N, a, &p->M, &zero, c, &p->N);
    } else {
        const int ldb = p->b_stored_nk ? p->K : p->N;
        sgemm(p->b_stored_nk ? "T" : "N", "N", &p->N, &p->M, &p->K, &one, b, &ldb, a, &p->K,
              &zero, c, &p->N);
    }
}

static void own_product(const product* p, const float* a, const float* b, float* packed,
                        float* c, int first)
{
    if (p->transposed_a) {
        charlm_pack_f(p->K, p->N, b, p->N, 1, packed);
        charlm_packed_gemm_at_f(p->M, p->N, p->K, a, p->M, packed, 0, c, p->N);
        return;
    }
    if (first)
        charlm_pack_f(p->K, p->N, b, p->b_stored_nk ? 1 : p->N, p->b_stored_nk ? p->K : 1, packed);
    charlm_packed_gemm_f(p->M, p->N, p->K, a, p->K, packed, 0, c, p->N);
}

static int by_value(const void* x, const void* y)
{
    double a = *(const double*)x, b = *(const double*)y;
    return (a > b) - (a < b);
}

static sgemm_fn load(const char* path, const char* symbol)
{
    void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    sgemm_fn f = lib ? (sgemm_fn)dlsym(lib, symbol) : NULL;
    if (f == NULL)
        fprintf(stderr, "blas_products: cannot load %s from %s: %s\n", symbol, path, dlerror());
    return f;
}

int main(int argc, char** argv)
{
    if (argc != 3 && argc != 5) {
        fprintf(stderr, "usage: blas_products OPENBLAS_LIB SYMBOL [MKL_LIB SYMBOL]\n");
        return 2;
    }
    sgemm_fn libs[2] = {load(argv[1], argv[2]), argc == 5 ? load(argv[3], argv[4]) : NULL};
    if (libs[0] == NULL || (argc == 5 && libs[1] == NULL))
        return 1;
    const int runners = argc == 5 ? 3 : 2;   /* OpenBLAS, [MKL,] charlm */
    printf("| product | OpenBLAS |%s charlm's kernel |\n|---|---:|%s---:|\n",
           runners == 3 ? " MKL |" : "", runners == 3 ? "---:|" : "");
    for (int i = 0; i < N_PRODUCTS; i++) {
        const product* p = &PRODUCTS[i];
        float* a = filled((size_t)p->M * p->K);
        float* b = filled((size_t)p->K * p->N);
        float* c = filled((size_t)p->M * p->N);
        float* packed = aligned_alloc(64, charlm_packed_size_f(p->K, p->N) * sizeof(float) + 64);
        double seconds[3][ROUNDS];
        for (int round = 0; round < ROUNDS; round++)       /* the runners alternate */
            for (int w = 0; w < runners; w++) {
                const int own = w == runners - 1;
                double start = now();
                for (int r = 0; r < p->reps; r++) {
                    if (own)
                        own_product(p, a, b, packed, c, r == 0);
                    else
                        blas_product(libs[w], p, a, b, c);
                }
                seconds[w][round] = (now() - start) / p->reps;
            }
        printf("| %s |", p->name);
        for (int w = 0; w < runners; w++) {
            qsort(seconds[w], ROUNDS, sizeof(double), by_value);
            printf(" %.1f |", 2.0 * p->M * p->N * p->K / seconds[w][ROUNDS / 2] / 1e9);
        }
        printf("\n");
        free(a); free(b); free(c); free(packed);
    }
    return 0;
}
