/* mHC's per-token work around a sub-layer, fused (CPU).
 *
 * Before the sub-layer (pre_*), for each token t with streams x_t (n x C, row-major) and
 * the projection raw_t = x_t phi (K = 2n + n*n values, one GEMM by the caller, stored
 * tokens-last: raw is [K][T], as are its gradient's rows), it computes
 *   r      = (|x_t|^2 / (nC) + 1e-6)^(-1/2)            RMSNorm of vec(x_t), applied after phi
 *   logit  = static + alpha_group * r * raw_t           groups: pre (n), post (n), res (n*n)
 *   H_pre  = sigmoid(logit_pre), H_post = 2 sigmoid(logit_post)
 *   H_res  = Sinkhorn(exp(logit_res)), `iters` rounds of column then row normalisation
 *   res    = H_res x_t  (n x C),  branch = H_pre x_t  (C)
 * and the backward of all of it except the two GEMMs with phi, which the caller runs.
 * After it (post_*, post-LN blocks): out_k = LayerNorm(res_k + H_post[k] f) per stream.
 * Eager PyTorch spends most of this time launching ~100 small operations per call over
 * all tokens and writing their intermediates; here a block of LANES tokens is done at
 * once in L1, with the Sinkhorn loops running across the block's tokens (innermost, so
 * they vectorise), and the backward recomputes the coefficients instead of storing them.
 *
 * Compiled by seqrec/models/native.py once per dtype and expansion rate (-DREAL=float or
 * double, -DSTREAMS=n) and called through ctypes. Each entry point splits its tokens over
 * `threads` OpenMP threads; built with -fopenmp against the libgomp.so.1 PyTorch has already
 * loaded, they run on PyTorch's own thread pool (a second pool would compete with PyTorch's
 * spinning threads).
 * Must match MHCResidual's PyTorch path; tests/test_mhc_native.py checks both directions.
 */
#include <stdint.h>
#include <stdlib.h>
#include <tgmath.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#ifndef STREAMS
#error "build with -DSTREAMS=n, the expansion rate"
#endif
#define COEFS (2 * STREAMS + STREAMS * STREAMS)  /* K: H_pre, H_post, H_res logits per token */
#define LANES 16                /* tokens per block: the vector width of the Sinkhorn loops */
#define FLOOR ((real)-60)       /* exp(-60) ~ 1e-26: no normaliser can underflow */

typedef real lanes[LANES];

/* The code is written for any n, and each build fixes it (STREAMS, from -DSTREAMS=n): the
 * stream loops then unroll (UNROLL) and the channel loop inside them, now innermost,
 * vectorises, one pass over a token's channels doing all of its n x n products instead of
 * ~n^2 short loops (2.5x faster forward, 1.7x backward at n=4, C=50 than a generic build). */
#define PRAGMA(x) _Pragma(#x)
#define UNROLL PRAGMA(GCC unroll 8)

/* exp for the kernel's type. float: a branch-free Cody-Waite reduction and degree-6
 * polynomial (Cephes' expf, ~1 ulp on [-87, 88], clamped there) that gcc vectorises across
 * a block's lanes, unlike a call to libm's expf; double: libm's exp (its kernel is the one
 * gradchecked, and float64 is not the fast path). */
static inline real kexp(real v)
{
    if (sizeof(real) == sizeof(double))
        return exp(v);
    float x = v < -87.0f ? -87.0f : v > 88.0f ? 88.0f : (float)v;
    float k = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    union { int32_t i; float f; } scale = { .i = ((int32_t)k + 127) << 23 };
    return (real)((q * r * r + r + 1.0f) * scale.f);
}

static inline real sigmoid(real v) { return 1 / (1 + kexp(-v)); }

/* z minus its column's max, floored at FLOOR: the exponents Sinkhorn starts from (the shift
 * is removed exactly by the first column normalisation; the floor keeps every entry >= 1e-26
 * of its column's largest). */
static void shifted_logits(int n, const lanes *z, lanes *v)
{
    for (int j = 0; j < n; ++j) {
        lanes top;
        for (int l = 0; l < LANES; ++l) top[l] = z[j][l];
        for (int i = 1; i < n; ++i)
            for (int l = 0; l < LANES; ++l) top[l] = z[i * n + j][l] > top[l] ? z[i * n + j][l] : top[l];
        for (int i = 0; i < n; ++i)
            for (int l = 0; l < LANES; ++l) {
                real d = z[i * n + j][l] - top[l];
                v[i * n + j][l] = d < FLOOR ? FLOOR : d;
            }
    }
}

/* Column-then-row normalisation of exp(z - column max) for a block of n x n matrices
 * (z, p: [n*n][LANES]). `sums` ([2*iters*n][LANES], or NULL) receives each step's
 * normalisers for the backward. */
static void sinkhorn_forward(int n, int iters, const lanes *z, lanes *p, lanes *sums)
{
    shifted_logits(n, z, p);
    for (int k = 0; k < n * n; ++k)
        for (int l = 0; l < LANES; ++l) p[k][l] = kexp(p[k][l]);
    for (int it = 0; it < iters; ++it)
        for (int step = 0; step < 2; ++step)      /* 0: columns (sum over i), 1: rows (sum over j) */
            for (int a = 0; a < n; ++a) {
                int first = step ? a * n : a, stride = step ? 1 : n;
                lanes s = {0}, inv;
                for (int b = 0; b < n; ++b)
                    for (int l = 0; l < LANES; ++l) s[l] += p[first + b * stride][l];
                for (int l = 0; l < LANES; ++l) inv[l] = 1 / s[l];
                for (int b = 0; b < n; ++b)
                    for (int l = 0; l < LANES; ++l) p[first + b * stride][l] *= inv[l];
                if (sums)
                    for (int l = 0; l < LANES; ++l) sums[(2 * it + step) * n + a][l] = s[l];
            }
}

/* Gradient of the logits z from the gradient g of the output p (g is overwritten with it).
 * Walks the steps in reverse: for Y = X / s with s = X.sum(dim), dX = (dY - sum(dY*Y, dim)) / s,
 * and X = Y * s rebuilds the previous iterate. exp'(v) = exp(v) ends it; entries floored at
 * FLOOR get no gradient (the per-column max shift is a constant, as in the PyTorch path). */
static void sinkhorn_backward(int n, int iters, const lanes *z, const lanes *p, const lanes *sums, lanes *g)
{
    lanes y[STREAMS * STREAMS];
    for (int k = 0; k < n * n; ++k)
        for (int l = 0; l < LANES; ++l) y[k][l] = p[k][l];
    for (int it = iters - 1; it >= 0; --it)
        for (int step = 1; step >= 0; --step)
            for (int a = 0; a < n; ++a) {
                int first = step ? a * n : a, stride = step ? 1 : n;
                const real *s = sums[(2 * it + step) * n + a];
                lanes d = {0}, inv;
                for (int b = 0; b < n; ++b)
                    for (int l = 0; l < LANES; ++l) d[l] += g[first + b * stride][l] * y[first + b * stride][l];
                for (int l = 0; l < LANES; ++l) inv[l] = 1 / s[l];
                for (int b = 0; b < n; ++b)
                    for (int l = 0; l < LANES; ++l) {
                        g[first + b * stride][l] = (g[first + b * stride][l] - d[l]) * inv[l];
                        y[first + b * stride][l] *= s[l];
                    }
            }
    lanes *v = y;  /* y is exp(v) now: reuse it for the floor test after the product */
    for (int k = 0; k < n * n; ++k)
        for (int l = 0; l < LANES; ++l) g[k][l] *= y[k][l];
    shifted_logits(n, z, v);
    for (int k = 0; k < n * n; ++k)
        for (int l = 0; l < LANES; ++l) g[k][l] = v[k][l] > FLOOR ? g[k][l] : 0;
}

/* Logits [K][LANES] and 1/rms of the block's tokens t0..t0+count-1 (lanes past count are 0).
 * raw is tokens-last, [K][T]: each logit's lanes are one contiguous run. */
static void block_logits(int n, int C, int64_t T, int64_t t0, int count, const real *restrict x,
                         const real *restrict raw, const real *restrict alpha, const real *restrict bias,
                         lanes *logit, real *restrict r)
{
    int D = n * C, K = 2 * n + n * n;
    for (int l = 0; l < LANES; ++l) {
        real ss = 0;
        if (l < count)
            for (int i = 0; i < D; ++i) ss += x[(t0 + l) * D + i] * x[(t0 + l) * D + i];
        r[l] = l < count ? 1 / sqrt(ss / D + (real)1e-6) : 0;
    }
    for (int k = 0; k < K; ++k) {
        const real *restrict rk = raw + k * T + t0, a = alpha[k < n ? 0 : k < 2 * n ? 1 : 2];
        for (int l = 0; l < count; ++l) logit[k][l] = bias[k] + a * r[l] * rk[l];
        for (int l = count; l < LANES; ++l) logit[k][l] = 0;
    }
}

/* sigmoid of the pre and post logits across a block's lanes: gate[j] = H_pre[j],
 * gate[n + j] = H_post[j] / 2. */
static void gates(int n, const lanes *logit, lanes *gate)
{
    for (int k = 0; k < 2 * n; ++k)
        for (int l = 0; l < LANES; ++l) gate[k][l] = sigmoid(logit[k][l]);
}

/* One token's mixing weights w[(n+1) x n] from its block lane l: rows 0..n-1 H_res, row n H_pre. */
static void token_weights(int n, int l, const lanes *h_res, const lanes *gate, real *restrict w)
{
    UNROLL for (int k = 0; k < n * n; ++k) w[k] = h_res[k][l];
    UNROLL for (int j = 0; j < n; ++j) w[n * n + j] = gate[j][l];
}

static void pre_forward(int n, int64_t T, int64_t t0, int64_t t1, int C, int iters,
                        const real *restrict x, const real *restrict raw, const real *restrict alpha,
                        const real *restrict bias, real *restrict res, real *restrict branch,
                        real *restrict h_post)
{
    int D = n * C;
    lanes logit[COEFS], h_res[STREAMS * STREAMS], gate[2 * STREAMS];
    real r[LANES];
    for (int64_t tb = t0; tb < t1; tb += LANES) {
        int count = t1 - tb < LANES ? (int)(t1 - tb) : LANES;
        block_logits(n, C, T, tb, count, x, raw, alpha, bias, logit, r);
        sinkhorn_forward(n, iters, logit + 2 * n, h_res, 0);
        gates(n, logit, gate);
        for (int l = 0; l < count; ++l) {
            int64_t t = tb + l;
            const real *restrict xt = x + t * D;
            real *restrict rt = res + t * D, *restrict bt = branch + t * C, w[(STREAMS + 1) * STREAMS];
            token_weights(n, l, h_res, gate, w);
            for (int j = 0; j < n; ++j) h_post[t * n + j] = 2 * gate[n + j][l];
            for (int c = 0; c < C; ++c)  /* rows 0..n-1: H_res x; row n: H_pre x */
                UNROLL for (int i = 0; i <= n; ++i) {
                    real a = 0;
                    UNROLL for (int j = 0; j < n; ++j) a += w[i * n + j] * xt[j * C + c];
                    if (i < n) rt[i * C + c] = a;
                    else bt[c] = a;
                }
        }
    }
}

/* Gradients of x (mixing and RMS terms; the caller adds graw^T @ phi^T), of raw (graw, [K][T] as raw), and
 * this range's sums of the alpha (3) and bias (K) gradients, added to g_alpha and g_bias at
 * the end (summed on the stack meanwhile: the threads' output rows share cache lines, and
 * writing them per block made the threads invalidate each other's copies). `sums` is
 * scratch of 2*iters*n*LANES reals. */
static void pre_backward(int n, int64_t T, int64_t t0, int64_t t1, int C, int iters,
                         const real *restrict x, const real *restrict raw, const real *restrict alpha,
                         const real *restrict bias,
                         const real *restrict g_res, const real *restrict g_branch, const real *restrict g_post,
                         real *restrict g_x, real *restrict g_raw, real *restrict g_alpha, real *restrict g_bias,
                         lanes *sums)
{
    int D = n * C, K = 2 * n + n * n;
    lanes logit[COEFS], g_logit[COEFS], h_res[STREAMS * STREAMS], gate[2 * STREAMS];
    real r[LANES], alpha_sum[3] = {0}, bias_sum[COEFS] = {0};
    for (int64_t tb = t0; tb < t1; tb += LANES) {
        int count = t1 - tb < LANES ? (int)(t1 - tb) : LANES;
        block_logits(n, C, T, tb, count, x, raw, alpha, bias, logit, r);
        sinkhorn_forward(n, iters, logit + 2 * n, h_res, sums);
        for (int k = 0; k < K; ++k)
            for (int l = count; l < LANES; ++l) g_logit[k][l] = 0;
        /* mixing: dx_j = sum_i H_res[i][j] g_res_i + H_pre[j] g_branch; dH[i][j] = <g_res_i, x_j> */
        gates(n, logit, gate);
        for (int l = 0; l < count; ++l) {
            int64_t t = tb + l;
            const real *restrict xt = x + t * D, *restrict gr = g_res + t * D, *restrict gb = g_branch + t * C;
            real *restrict gx = g_x + t * D, w[(STREAMS + 1) * STREAMS];
            token_weights(n, l, h_res, gate, w);
            for (int j = 0; j < n; ++j) {
                real dot[STREAMS + 1] = {0};  /* <g_res_i, x_j> for i < n, <g_branch, x_j> last */
                for (int c = 0; c < C; ++c) {
                    real xv = xt[j * C + c], a = w[n * n + j] * gb[c];
                    dot[n] += gb[c] * xv;
                    UNROLL for (int i = 0; i < n; ++i) {
                        a += w[i * n + j] * gr[i * C + c];
                        dot[i] += gr[i * C + c] * xv;
                    }
                    gx[j * C + c] = a;
                }
                real s = gate[j][l], sp = gate[n + j][l];
                g_logit[j][l] = dot[n] * s * (1 - s);
                g_logit[n + j][l] = g_post[t * n + j] * 2 * sp * (1 - sp);
                for (int i = 0; i < n; ++i) g_logit[2 * n + i * n + j][l] = dot[i];
            }
        }
        sinkhorn_backward(n, iters, logit + 2 * n, h_res, sums, g_logit + 2 * n);
        /* logit = bias + alpha * r * raw: through r = (|x|^2/D + eps)^(-1/2), dr/dx = -r^3 x / D */
        for (int k = 0; k < K; ++k) {
            real sum = 0;
            for (int l = 0; l < LANES; ++l) sum += g_logit[k][l];  /* lanes past count are 0 */
            bias_sum[k] += sum;
        }
        real g_r[LANES] = {0};
        for (int group = 0; group < 3; ++group) {  /* pre, post, res: logits [k0, k1) */
            int k0 = group ? n * group : 0, k1 = group == 2 ? K : n * (group + 1);
            real dot[LANES] = {0};
            for (int k = k0; k < k1; ++k) {
                const real *restrict rk = raw + k * T + tb;
                real *restrict gk = g_raw + k * T + tb;
                for (int l = 0; l < count; ++l) {
                    dot[l] += g_logit[k][l] * rk[l];
                    gk[l] = r[l] * alpha[group] * g_logit[k][l];
                }
            }
            for (int l = 0; l < count; ++l) {
                alpha_sum[group] += r[l] * dot[l];
                g_r[l] += alpha[group] * dot[l];
            }
        }
        for (int l = 0; l < count; ++l) {
            const real *restrict xt = x + (tb + l) * D;
            real *restrict gx = g_x + (tb + l) * D, scale = -r[l] * r[l] * r[l] * g_r[l] / D;
            for (int i = 0; i < D; ++i) gx[i] += scale * xt[i];
        }
    }
    for (int group = 0; group < 3; ++group) g_alpha[group] += alpha_sum[group];
    for (int k = 0; k < K; ++k) g_bias[k] += bias_sum[k];
}

/* Post-LN update after the sub-layer: out_k = LayerNorm(res_k + h_post[k] * f) for each of
 * a token's n streams (one LayerNorm over C with weight w and bias b, shared by the
 * streams), as MHCResidual does with PyTorch ops in two passes plus LayerNorm's own.
 * For the backward it writes each stream's mean and 1/std (stats: [T][n][2], or NULL in
 * evaluation); the backward recomputes the normalised values from res, which the caller
 * keeps, so the forward writes one [T, n, C] tensor (out) and no copy of the normalised
 * values. */
static void post_forward(int n, int64_t t0, int64_t t1, int C, double eps,
                         const real *restrict res, const real *restrict h_post, const real *restrict f,
                         const real *restrict w, const real *restrict b, real *restrict out, real *restrict stats)
{
    for (int64_t t = t0; t < t1; ++t)
        for (int k = 0; k < n; ++k) {
            int64_t row = (t * n + k) * C;
            const real *restrict ft = f + t * C, *restrict rk = res + row, h = h_post[t * n + k];
            real *restrict o = out + row, mean = 0, var = 0;
            for (int c = 0; c < C; ++c) {
                o[c] = rk[c] + h * ft[c];
                mean += o[c];
            }
            mean /= C;
            for (int c = 0; c < C; ++c) var += (o[c] - mean) * (o[c] - mean);
            real r = 1 / sqrt(var / C + (real)eps);
            for (int c = 0; c < C; ++c) o[c] = (o[c] - mean) * r * w[c] + b[c];
            if (stats) {
                stats[2 * (t * n + k)] = mean;
                stats[2 * (t * n + k) + 1] = r;
            }
        }
}

/* Its backward: with xhat = (res_k + h_k f - mean) rstd recomputed and dxhat = g w,
 * dy = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)); dres = dy, dh = <dy, f>,
 * df = sum_k h_k dy_k; this range's weight and bias gradients are added to g_w, g_b (C each;
 * the caller gives each thread its own, see mhc_post_backward). */
static void post_backward(int n, int64_t t0, int64_t t1, int C,
                          const real *restrict res, const real *restrict stats, const real *restrict h_post,
                          const real *restrict f, const real *restrict w, const real *restrict g,
                          real *restrict g_res, real *restrict g_post, real *restrict g_f,
                          real *restrict g_w, real *restrict g_b)
{
    for (int64_t t = t0; t < t1; ++t) {
        const real *restrict ft = f + t * C;
        real *restrict gf = g_f + t * C;
        for (int c = 0; c < C; ++c) gf[c] = 0;
        for (int k = 0; k < n; ++k) {
            int64_t row = (t * n + k) * C;
            const real *restrict rk = res + row, *restrict gk = g + row, h = h_post[t * n + k];
            real mean = stats[2 * (t * n + k)], r = stats[2 * (t * n + k) + 1];
            real *restrict dy = g_res + row, m1 = 0, m2 = 0, dh = 0;
            for (int c = 0; c < C; ++c) {
                real xh = (rk[c] + h * ft[c] - mean) * r, d = gk[c] * w[c];
                m1 += d;
                m2 += d * xh;
                g_w[c] += gk[c] * xh;
                g_b[c] += gk[c];
            }
            m1 /= C;
            m2 /= C;
            for (int c = 0; c < C; ++c) {
                real xh = (rk[c] + h * ft[c] - mean) * r;
                dy[c] = r * (gk[c] * w[c] - m1 - xh * m2);
                dh += dy[c] * ft[c];
                gf[c] += h * dy[c];
            }
            g_post[t * n + k] = dh;
        }
    }
}

/* The collapse before the final norm: out_t = sum_k w[k] x_t,k, one pass over the streams
 * (PyTorch's broadcast product and sum make three over the [T, n, C] tensor, and five in the
 * backward). Its backward: g_x_t,k = w[k] g_t, and this range's weight gradient
 * sum_t <g_t, x_t,k> is added to g_w (n). */
static void collapse_forward(int n, int64_t t0, int64_t t1, int C, const real *restrict x,
                             const real *restrict w, real *restrict out)
{
    for (int64_t t = t0; t < t1; ++t) {
        const real *restrict xt = x + t * n * C;
        real *restrict o = out + t * C;
        for (int c = 0; c < C; ++c) {
            real a = 0;
            UNROLL for (int k = 0; k < n; ++k) a += w[k] * xt[k * C + c];
            o[c] = a;
        }
    }
}

static void collapse_backward(int n, int64_t t0, int64_t t1, int C, const real *restrict x,
                              const real *restrict w, const real *restrict g, real *restrict g_x,
                              real *restrict g_w)
{
    real sums[STREAMS] = {0};
    for (int64_t t = t0; t < t1; ++t) {
        const real *restrict xt = x + t * n * C, *restrict gt = g + t * C;
        real *restrict gx = g_x + t * n * C;
        for (int c = 0; c < C; ++c)
            UNROLL for (int k = 0; k < n; ++k) {
                sums[k] += gt[c] * xt[k * C + c];
                gx[k * C + c] = w[k] * gt[c];
            }
    }
    for (int k = 0; k < n; ++k) g_w[k] += sums[k];
}

/* The calling thread's share [*t0, *t1) of `tokens`, in whole blocks of LANES tokens. */
static void share(int64_t tokens, int64_t *t0, int64_t *t1)
{
    int64_t blocks = (tokens + LANES - 1) / LANES, parts = 1, me = 0;
#ifdef _OPENMP
    parts = omp_get_num_threads();
    me = omp_get_thread_num();
#endif
    *t0 = blocks * me / parts * LANES;
    *t1 = blocks * (me + 1) / parts * LANES;
    *t0 = *t0 < tokens ? *t0 : tokens;
    *t1 = *t1 < tokens ? *t1 : tokens;
}

static int thread_index(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* The entry points. Per-thread sums of parameter gradients go to row thread_index() of
 * [threads][size] outputs, which the caller zeroes and adds up. */
void mhc_pre_forward(int64_t tokens, int threads, int C, int iters,
                     const real *x, const real *raw, const real *alpha, const real *bias,
                     real *res, real *branch, real *h_post)
{
#pragma omp parallel num_threads(threads)
    {
        int64_t t0, t1;
        share(tokens, &t0, &t1);
        pre_forward(STREAMS, tokens, t0, t1, C, iters, x, raw, alpha, bias, res, branch, h_post);
    }
}

/* Returns 0, or 1 when a thread could not allocate its Sinkhorn scratch (gradients unset). */
int mhc_pre_backward(int64_t tokens, int threads, int C, int iters,
                     const real *x, const real *raw, const real *alpha, const real *bias,
                     const real *g_res, const real *g_branch, const real *g_post,
                     real *g_x, real *g_raw, real *g_alpha, real *g_bias)
{
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int64_t t0, t1;
        share(tokens, &t0, &t1);
        int me = thread_index();
        lanes *sums = malloc(sizeof(lanes) * 2 * (size_t)iters * STREAMS);
        if (sums)
            pre_backward(STREAMS, tokens, t0, t1, C, iters, x, raw, alpha, bias, g_res, g_branch, g_post, g_x, g_raw,
                         g_alpha + 3 * me, g_bias + COEFS * me, sums);
        else {
#pragma omp atomic write
            failed = 1;
        }
        free(sums);
    }
    return failed;
}

void mhc_post_forward(int64_t tokens, int threads, int C, double eps,
                      const real *res, const real *h_post, const real *f, const real *w, const real *b,
                      real *out, real *stats)
{
#pragma omp parallel num_threads(threads)
    {
        int64_t t0, t1;
        share(tokens, &t0, &t1);
        post_forward(STREAMS, t0, t1, C, eps, res, h_post, f, w, b, out, stats);
    }
}

/* Returns 0, or 1 when a thread could not allocate its sums (gradients unset). Each thread sums
 * its weight and bias gradients in its own cache lines and copies them to its output rows at
 * the end: they are updated for every stream of every token, and rows of C reals side by
 * side share a cache line, which two threads writing it pass back and forth (it made the
 * two-thread backward no faster than one). */
int mhc_post_backward(int64_t tokens, int threads, int C,
                      const real *res, const real *stats, const real *h_post, const real *f, const real *w,
                      const real *g, real *g_res, real *g_post, real *g_f, real *g_w, real *g_b)
{
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int64_t t0, t1;
        share(tokens, &t0, &t1);
        int me = thread_index();
        size_t bytes = (2 * (size_t)C * sizeof(real) + 63) / 64 * 64;
        real *sums = aligned_alloc(64, bytes);
        if (sums) {
            for (int c = 0; c < 2 * C; ++c) sums[c] = 0;
            post_backward(STREAMS, t0, t1, C, res, stats, h_post, f, w, g, g_res, g_post, g_f, sums, sums + C);
            for (int c = 0; c < C; ++c) {
                g_w[C * me + c] = sums[c];
                g_b[C * me + c] = sums[C + c];
            }
        } else {
#pragma omp atomic write
            failed = 1;
        }
        free(sums);
    }
    return failed;
}

void mhc_collapse_forward(int64_t tokens, int threads, int C, const real *x, const real *w, real *out)
{
#pragma omp parallel num_threads(threads)
    {
        int64_t t0, t1;
        share(tokens, &t0, &t1);
        collapse_forward(STREAMS, t0, t1, C, x, w, out);
    }
}

void mhc_collapse_backward(int64_t tokens, int threads, int C, const real *x, const real *w, const real *g,
                           real *g_x, real *g_w)
{
#pragma omp parallel num_threads(threads)
    {
        int64_t t0, t1;
        share(tokens, &t0, &t1);
        collapse_backward(STREAMS, t0, t1, C, x, w, g, g_x, g_w + STREAMS * thread_index());
    }
}
