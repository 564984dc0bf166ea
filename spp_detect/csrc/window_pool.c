/*
 * Pyramid max pooling of many windows of one channels-last conv map, on the CPU.
 *
 * The compiled twin of spp_detect/modeling/window_pool.py's table-based pooling, for maps whose
 * values order like signed integers (conv5 after its ReLU is pooled through its IEEE bit
 * patterns; int8-quantised maps as they are). Called from window_pool_native.py, which checks
 * every argument; nothing here validates.
 *
 * Per window (SPP-net sec. 2.3, the bins of spp.py: bin i of n over w cells starting at x1
 * covers x1 + floor(i*w/n) .. x1 + ceil((i+1)*w/n) - 1):
 *   - a base level n: for each row band i, the max over its rows of the window's cells, taken
 *     over contiguous runs of w*C values (one row of the window at a time); then each bin is
 *     the max of its columns of that band. Work ~ (h + n) * w * C per level.
 *   - a derived level m with a finer source level n = m*q: each bin is the max of a q x q group
 *     of the source's bins (exact: window_pool.py's module docstring, point 2).
 *   - a repeated level: a copy of its first occurrence.
 * The bins are written in the "bin" layout (each bin's C values contiguous) or transposed to
 * the SPP layer's "channel" layout (C x n x n per level).
 *
 * The GIL is released during the work, so several threads can pool disjoint ranges of windows.
 *
 * After editing, rebuild in place (`pip install -e .`, or `python setup.py build_ext --inplace`);
 * when pool()'s arguments change, bump WINDOW_POOL_ABI here and _ABI in window_pool_native.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(_MSC_VER)
#define restrict __restrict
#endif

/* Version of the calling convention of pool() below; window_pool_native.py refuses a build
   whose ABI differs from the one it was written for (a stale in-place build). */
#define WINDOW_POOL_ABI 2

/* One step of the pyramid plan (int64 x 5): what to compute, in order. */
enum { STEP_BASE = 0, STEP_DERIVED = 1, STEP_COPY = 2 };

/* Function multiversioning: the element loops below vectorise for each of these targets and
   the loader picks the best one the CPU has (GCC on x86-64 Linux; elsewhere the default). */
#if defined(__GNUC__) && __GNUC__ >= 11 && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && defined(__GLIBC__) /* target_clones needs glibc's ifunc */
#define MULTI_TARGET __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTI_TARGET
#endif

#define DEFINE_POOL(T, NAME)                                                                      \
    static inline void max_into_##NAME(T *restrict dst, const T *restrict src, int64_t n)       \
    {                                                                                             \
        for (int64_t k = 0; k < n; ++k)                                                           \
            dst[k] = src[k] > dst[k] ? src[k] : dst[k];                                           \
    }                                                                                             \
                                                                                                  \
    MULTI_TARGET static void pool_##NAME(const T *map, int64_t width, int64_t channels,           \
                                         const int64_t *cells, int64_t first, int64_t last,      \
                                         const int64_t *steps, int64_t num_steps,                \
                                         int64_t num_bins, T *out, int channel_layout, T *band,  \
                                         T *bins)                                                \
    {                                                                                             \
        const int64_t C = channels;                                                               \
        for (int64_t r = first; r < last; ++r) {                                                  \
            const int64_t x1 = cells[4 * r], y1 = cells[4 * r + 1];                               \
            const int64_t w = cells[4 * r + 2] - x1 + 1, h = cells[4 * r + 3] - y1 + 1;           \
            T *win = channel_layout ? bins : out + r * num_bins * C;                              \
            for (int64_t s = 0; s < num_steps; ++s) {                                             \
                const int64_t *step = steps + 5 * s;                                              \
                const int64_t n = step[1];                                                        \
                T *dst = win + step[2] * C;                                                       \
                if (step[0] == STEP_BASE) {                                                       \
                    for (int64_t i = 0; i < n; ++i) {                                             \
                        const int64_t y0 = y1 + (i * h) / n;                                      \
                        const int64_t y_end = y1 + ((i + 1) * h + n - 1) / n;                     \
                        const T *rows = map + (y0 * width + x1) * C;                              \
                        if (y_end - y0 > 1) { /* the band's max over its rows, all columns */    \
                            memcpy(band, rows, (size_t)(w * C) * sizeof(T));                      \
                            for (int64_t y = y0 + 1; y < y_end; ++y)                              \
                                max_into_##NAME(band, map + (y * width + x1) * C, w * C);         \
                            rows = band;                                                          \
                        }                                                                         \
                        for (int64_t j = 0; j < n; ++j) {                                         \
                            const int64_t x0 = (j * w) / n, x_end = ((j + 1) * w + n - 1) / n;    \
                            T *bin = dst + (i * n + j) * C;                                       \
                            memcpy(bin, rows + x0 * C, (size_t)C * sizeof(T));                    \
                            for (int64_t x = x0 + 1; x < x_end; ++x)                              \
                                max_into_##NAME(bin, rows + x * C, C);                            \
                        }                                                                         \
                    }                                                                             \
                } else if (step[0] == STEP_DERIVED) {                                             \
                    const T *src = win + step[3] * C;                                             \
                    const int64_t q = step[4], fine = n * q;                                      \
                    for (int64_t i = 0; i < n; ++i)                                               \
                        for (int64_t j = 0; j < n; ++j) {                                         \
                            T *bin = dst + (i * n + j) * C;                                       \
                            memcpy(bin, src + ((i * q) * fine + j * q) * C, (size_t)C * sizeof(T)); \
                            for (int64_t a = 0; a < q; ++a)                                       \
                                for (int64_t b = (a == 0); b < q; ++b)                            \
                                    max_into_##NAME(                                              \
                                        bin, src + ((i * q + a) * fine + j * q + b) * C, C);      \
                        }                                                                         \
                } else { /* STEP_COPY */                                                          \
                    memcpy(dst, win + step[3] * C, (size_t)(n * n * C) * sizeof(T));             \
                }                                                                                 \
            }                                                                                     \
            if (channel_layout) { /* per level (n x n, C) -> (C, n x n) */                        \
                T *row = out + r * num_bins * C;                                                  \
                for (int64_t s = 0; s < num_steps; ++s) {                                         \
                    const int64_t nn = steps[5 * s + 1] * steps[5 * s + 1], pos = steps[5 * s + 2]; \
                    for (int64_t b = 0; b < nn; ++b)                                              \
                        for (int64_t c = 0; c < C; ++c)                                           \
                            row[pos * C + c * nn + b] = bins[(pos + b) * C + c];                  \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_POOL(int8_t, i8)
DEFINE_POOL(int16_t, i16)
DEFINE_POOL(int32_t, i32)
DEFINE_POOL(int64_t, i64)

/* pool(map, width, channels, itemsize, cells, first, last, steps, num_steps, num_bins, out,
 *      channel_layout)
 * Addresses are passed as integers (tensor.data_ptr()); map is [H, W, C] contiguous, cells
 * int64 [R, 4] (x1, y1, x2, y2 inclusive, valid), steps int64 [num_steps, 5], out [R, num_bins
 * * C] contiguous; windows first .. last - 1 are pooled. Scratch per call: one row band of the
 * widest possible window (W * C values) and, for the channel layout, one window's bins. */
static PyObject *pool(PyObject *self, PyObject *args)
{
    unsigned long long map, cells, steps, out;
    Py_ssize_t width, channels, itemsize, first, last, num_steps, num_bins;
    int channel_layout;
    if (!PyArg_ParseTuple(args, "KnnnKnnKnnKi", &map, &width, &channels, &itemsize, &cells,
                          &first, &last, &steps, &num_steps, &num_bins, &out, &channel_layout))
        return NULL;
    size_t band_bytes = (size_t)(width * channels) * (size_t)itemsize;
    size_t bins_bytes = (size_t)(num_bins * channels) * (size_t)itemsize;
    char *scratch = malloc(band_bytes + bins_bytes);
    if (scratch == NULL)
        return PyErr_NoMemory();
    void *band = scratch, *bins = scratch + band_bytes;
    const int64_t *c = (const int64_t *)(uintptr_t)cells, *st = (const int64_t *)(uintptr_t)steps;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    switch (itemsize) {
    case 1:
        pool_i8((const int8_t *)(uintptr_t)map, width, channels, c, first, last, st, num_steps,
                num_bins, (int8_t *)(uintptr_t)out, channel_layout, band, bins);
        break;
    case 2:
        pool_i16((const int16_t *)(uintptr_t)map, width, channels, c, first, last, st, num_steps,
                 num_bins, (int16_t *)(uintptr_t)out, channel_layout, band, bins);
        break;
    case 4:
        pool_i32((const int32_t *)(uintptr_t)map, width, channels, c, first, last, st, num_steps,
                 num_bins, (int32_t *)(uintptr_t)out, channel_layout, band, bins);
        break;
    case 8:
        pool_i64((const int64_t *)(uintptr_t)map, width, channels, c, first, last, st, num_steps,
                 num_bins, (int64_t *)(uintptr_t)out, channel_layout, band, bins);
        break;
    default:
        ok = 0;
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "window pooling: unsupported item size %zd", itemsize);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pool", pool, METH_VARARGS, "Pyramid max pooling of windows of a channels-last map."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_window_pool", "Compiled CPU window pooling (window_pool_native.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__window_pool(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "ABI", WINDOW_POOL_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
