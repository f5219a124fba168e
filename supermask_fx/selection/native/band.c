/* The compiled CPU passes of edge-popup for float32 scores and weights (loaded by supermask_fx/native):
 * sfx_topk, the "band" top-k (supermask_fx/topk.py) in one call for many selectors; sfx_straight_through, the
 * score gradient; sfx_apply_mask, w * mask (PyTorch's float-times-bool product is a slow mixed-type loop);
 * sfx_apply_bits and sfx_unpack_bits, the same for a mask stored as bits.
 *
 * Bit masks: entry i of a layer is bit (i % 64) of 64-bit word i / 64 (ceil(n / 64) words, the tail bits 0).
 *
 * sfx_topk's inputs are two int64 tables.
 *   segments (nseg x 6): [scores, weight, mask bits, effective, n, group]. Pointers as integers; effective may be 0
 *       (not written). A group's segments are consecutive rows in flat order (one per layer; several for one
 *       globally ranked selector).
 *   groups (ngroups x 7): in: [lo, hi, kept]; out: [status, threshold, above, band]. lo, hi and threshold are
 *       order keys (below): the band [lo, hi) around last step's threshold, and the kept-th largest key.
 * Order keys: a score s is ranked by key(s) = 0 if |s| is NaN, else (bits of s & 0x7fffffff) + 1. Non-negative
 * floats order like their bit patterns, so the keys order the magnitudes as numbers (+inf, key 0x7f800001, above
 * every finite one), with every NaN below them all (key 0): the rule of supermask_fx/topk.py. Every magnitude,
 * NaN and inf included, has an integer key, so the band [T, T + 1) always holds the threshold T.
 *
 * sfx_topk, per group (segment after segment, in flat order):
 *   1. one read of the scores (threads over chunks of SFX_CHUNK entries of every segment):
 *      mask bit = key(s) >= hi, effective = mask ? w : 0; per chunk the counts
 *      of key(s) >= hi and of lo <= key(s) < hi, and the band entries' offsets in a per-chunk region (when they fit:
 *      a band over 1/32 of a chunk is rare; such chunks are scanned again in step 2);
 *   2. (threads over groups) above = #(key >= hi), band = #(lo <= key < hi). If above < kept <= above + band,
 *      the kept-th largest key, T, lies in the band: T is found by a radix select over the band's keys, and
 *      the band entries above T, then those equal to T in flat order until kept are set in mask (and
 *      effective): status 1, threshold T. Otherwise status 0 (a miss: the caller retries with a wider band or
 *      the exact T; the mask then holds key >= hi only).
 *   kept = n (keep everything) is a call with lo = hi = 0 (every key); its status is 0 and every mask bit is set.
 *
 * Threads: work is handed out by an atomic counter to the threads of PyTorch's own OpenMP pool when this file is
 * built with -fopenmp and linked against the OpenMP runtime PyTorch loaded (supermask_fx/native decides), else to
 * plain pthreads started per call. Sharing PyTorch's pool matters: threads of a second pool, or started per call,
 * make the scheduler move PyTorch's workers around, and the convolutions that follow ran 10-25 % slower.
 * The pass's inner loops are branch-free integer code over blocks of 64 entries, each flag shifted into its
 * bit of a word by a constant, so the compiler vectorises them; band entries are then found a 64-bit word at a
 * time. target_clones adds an AVX2 copy chosen at load time.
 * Returns 0, or -1 when memory for the per-call scratch cannot be allocated (nothing is then written).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SFX_CHUNK ((int64_t)1 << 18)
#define SFX_MAX_THREADS 256
#define SEG_COLS 6
#define GROUP_COLS 7

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SFX_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SFX_CLONES
#endif

/* Length of the chunk that starts at `start` in n entries. */
static int64_t chunk_len(int64_t n, int64_t start) { return n - start < SFX_CHUNK ? n - start : SFX_CHUNK; }

/* Band offsets a chunk of len entries can keep without a second scan. */
static int64_t region_cap(int64_t len) { return (len >> 5) + 64; }

/* The order key of a float32 score's bits: 0 for a NaN magnitude, else the magnitude's bits + 1 (branch-free). */
static inline uint32_t order_key(uint32_t bits) {
  uint32_t m = bits & 0x7fffffffu;
  return (m + 1u) & (0u - (uint32_t)(m <= 0x7f800000u));
}

/* 64 flag bytes (0/1) -> a word with bit j = flag j. */
static uint64_t pack_flags(const uint8_t *flags) {
  uint64_t word = 0;
  for (int k = 0; k < 8; k++) {
    uint64_t eight;
    memcpy(&eight, flags + 8 * k, 8);
    word |= ((eight * 0x0102040810204080ull) >> 56) << (8 * k);
  }
  return word;
}

/* BIT[j] = 1 << j. Bits go into and out of words through this table (AND with BIT[j], a mask from a compare)
 * rather than shifts by j, so that the loops over j vectorise without per-lane variable shifts (SSE2 has none). */
static const uint32_t BIT[32] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,  1u << 8,  1u << 9,  1u << 10,
    1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15, 1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21,
    1u << 22, 1u << 23, 1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};

/* The bits of 32 entries: bit j of *up = key(s[j]) >= hi, of *in_band = lo <= key(s[j]) < hi (lo <= hi); a word
 * at a time, 1.6x faster (AVX2) than flag bytes packed afterwards. */
static inline void flags32(const uint32_t *restrict s, uint32_t lo, uint32_t hi, uint32_t *up, uint32_t *in_band) {
  uint32_t u = 0, b = 0;
  for (int j = 0; j < 32; j++) {
    uint32_t key = order_key(s[j]), above = 0u - (uint32_t)(key >= hi);
    u |= above & BIT[j];
    b |= ((0u - (uint32_t)(key >= lo)) ^ above) & BIT[j];
  }
  *up = u;
  *in_band = b;
}

/* Step 1 on one chunk of n entries (starting at a multiple of 64): mask bits (+ effective); band offsets into
 * out (up to cap). Returns the band count (which may exceed cap: then out holds only the first cap). */
SFX_CLONES
static int64_t pass_range(const uint32_t *restrict s, const uint32_t *restrict w, int64_t n, uint32_t lo,
                          uint32_t hi, uint64_t *restrict mask, uint32_t *restrict eff, uint32_t *restrict out,
                          int64_t cap, int64_t *above) {
  int64_t up_total = 0, band = 0;
  for (int64_t base = 0; base < n; base += 64) {
    const uint32_t *sb = s + base;
    uint64_t ups = 0, flags = 0;
    if (n - base >= 64) {
      uint32_t u0, u1, b0, b1;
      flags32(sb, lo, hi, &u0, &b0);
      flags32(sb + 32, lo, hi, &u1, &b1);
      ups = u0 | (uint64_t)u1 << 32;
      flags = b0 | (uint64_t)b1 << 32;
      if (eff) {
        const uint32_t *wb = w + base;
        uint32_t *eb = eff + base;
        for (int j = 0; j < 32; j++) eb[j] = wb[j] & (0u - (uint32_t)((u0 & BIT[j]) != 0));
        for (int j = 0; j < 32; j++) eb[32 + j] = wb[32 + j] & (0u - (uint32_t)((u1 & BIT[j]) != 0));
      }
    } else { /* the last, partial word of a layer */
      for (int j = 0; j < n - base; j++) {
        uint32_t key = order_key(sb[j]);
        uint64_t up = key >= hi;
        ups |= up << j;
        flags |= (uint64_t)((key >= lo) ^ (uint32_t)up) << j;
        if (eff) eff[base + j] = w[base + j] & (0u - (uint32_t)up);
      }
    }
    up_total += __builtin_popcountll(ups);
    mask[base >> 6] = ups;
    for (uint64_t word = flags; word; word &= word - 1) {
      if (band < cap) out[band] = (uint32_t)(base + __builtin_ctzll(word));
      band++;
    }
  }
  *above = up_total;
  return band;
}

/* The band offsets of a chunk whose band did not fit its region: scan it again. */
SFX_CLONES
static void collect_range(const uint32_t *restrict s, int64_t n, uint32_t lo, uint32_t hi, uint32_t *restrict out) {
  uint8_t flags[64];
  for (int64_t base = 0; base < n; base += 64) {
    int width = n - base < 64 ? (int)(n - base) : 64;
    if (width < 64) memset(flags, 0, sizeof flags);
    for (int j = 0; j < width; j++) {
      uint32_t key = order_key(s[base + j]);
      flags[j] = (uint8_t)((key >= lo) & (key < hi));
    }
    for (uint64_t word = pack_flags(flags); word; word &= word - 1)
      *out++ = (uint32_t)(base + __builtin_ctzll(word));
  }
}

/* The count-th largest of the keys vals[0, n) (1 <= count <= n): radix select, 8 bits at a time, from the top. */
static uint32_t kth_largest(const uint32_t *vals, int64_t n, int64_t count) {
  uint32_t prefix = 0, known = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    int64_t hist[256] = {0};
    for (int64_t i = 0; i < n; i++)
      if ((vals[i] & known) == prefix) hist[(vals[i] >> shift) & 255u]++;
    int b = 255;
    while (hist[b] < count) count -= hist[b--];
    prefix |= (uint32_t)b << shift;
    known |= 255u << shift;
  }
  return prefix;
}

typedef struct {
  const int64_t *seg;
  int64_t nseg, nchunks, ngroups;
  int64_t *groups;
  int64_t *chunk_seg, *chunk_start, *chunk_len; /* nchunks each */
  int64_t *chunk_region, *chunk_above, *chunk_band;
  int64_t *group_first_chunk;                   /* ngroups + 1 */
  uint32_t *regions;
} job_t;

static void run_chunk(job_t *job, int64_t c) {
  const int64_t *row = job->seg + SEG_COLS * job->chunk_seg[c];
  const int64_t *grp = job->groups + GROUP_COLS * row[5];
  int64_t start = job->chunk_start[c];
  const uint32_t *s = (const uint32_t *)(intptr_t)row[0] + start;
  const uint32_t *w = (const uint32_t *)(intptr_t)row[1] + start;
  uint64_t *mask = (uint64_t *)(intptr_t)row[2] + (start >> 6);
  uint32_t *eff = row[3] ? (uint32_t *)(intptr_t)row[3] + start : NULL;
  job->chunk_band[c] = pass_range(s, w, job->chunk_len[c], (uint32_t)grp[0], (uint32_t)grp[1], mask, eff,
                                  job->regions + job->chunk_region[c], region_cap(job->chunk_len[c]),
                                  &job->chunk_above[c]);
}

/* The band offsets of chunk c into out (its region, or a second scan if the band did not fit). */
static void band_of_chunk(const job_t *job, int64_t c, uint32_t lo, uint32_t hi, uint32_t *out) {
  int64_t count = job->chunk_band[c];
  if (count <= region_cap(job->chunk_len[c])) {
    memcpy(out, job->regions + job->chunk_region[c], (size_t)count * sizeof(uint32_t));
  } else {
    const int64_t *row = job->seg + SEG_COLS * job->chunk_seg[c];
    collect_range((const uint32_t *)(intptr_t)row[0] + job->chunk_start[c], job->chunk_len[c], lo, hi, out);
  }
}

static void run_group(job_t *job, int64_t g) {
  int64_t *grp = job->groups + GROUP_COLS * g;
  uint32_t lo = (uint32_t)grp[0], hi = (uint32_t)grp[1];
  int64_t kept = grp[2], above = 0, band = 0;
  int64_t first = job->group_first_chunk[g], last = job->group_first_chunk[g + 1];
  for (int64_t c = first; c < last; c++) {
    above += job->chunk_above[c];
    band += job->chunk_band[c];
  }
  grp[3] = 0;
  grp[5] = above;
  grp[6] = band;
  int64_t missing = kept - above;
  if (missing <= 0 || band < missing) return; /* T is not in [lo, hi) */
  uint32_t *offsets = malloc((size_t)band * sizeof(uint32_t));
  uint32_t *vals = malloc((size_t)band * sizeof(uint32_t));
  if (!offsets || !vals) {
    free(offsets);
    free(vals);
    grp[3] = -1;
    return;
  }
  int64_t j = 0;
  for (int64_t c = first; c < last; c++) {
    const int64_t *row = job->seg + SEG_COLS * job->chunk_seg[c];
    const uint32_t *s = (const uint32_t *)(intptr_t)row[0] + job->chunk_start[c];
    band_of_chunk(job, c, lo, hi, offsets + j);
    for (int64_t i = j; i < j + job->chunk_band[c]; i++) vals[i] = order_key(s[offsets[i]]);
    j += job->chunk_band[c];
  }
  uint32_t t = kth_largest(vals, band, missing);
  int64_t ties = missing; /* how many entries equal to T are kept: missing minus those above T */
  for (int64_t i = 0; i < band; i++) ties -= vals[i] > t;
  j = 0;
  for (int64_t c = first; c < last; c++) {
    const int64_t *row = job->seg + SEG_COLS * job->chunk_seg[c];
    int64_t start = job->chunk_start[c];
    uint64_t *mask = (uint64_t *)(intptr_t)row[2] + (start >> 6);
    const uint32_t *w = (const uint32_t *)(intptr_t)row[1] + start;
    uint32_t *eff = row[3] ? (uint32_t *)(intptr_t)row[3] + start : NULL;
    for (int64_t end = j + job->chunk_band[c]; j < end; j++) {
      int keep = vals[j] > t || (vals[j] == t && ties-- > 0);
      if (keep) {
        mask[offsets[j] >> 6] |= 1ull << (offsets[j] & 63);
        if (eff) eff[offsets[j]] = w[offsets[j]];
      }
    }
  }
  free(offsets);
  free(vals);
  grp[3] = 1;
  grp[4] = t;
}

/* A parallel loop's state, shared by its threads. */
typedef struct {
  void (*run)(void *, int64_t);
  void *ctx;
  int64_t total, next; /* next: atomic work counter */
} loop_t;

static void *loop_worker(void *arg) {
  loop_t *loop = (loop_t *)arg;
  for (;;) {
    int64_t i = __atomic_fetch_add(&loop->next, 1, __ATOMIC_RELAXED);
    if (i >= loop->total) return NULL;
    loop->run(loop->ctx, i);
  }
}

#ifdef _OPENMP
/* run_on_threads: loop_worker on `threads` threads of the OpenMP pool (the caller's among them). Only
 * GOMP_parallel is called: the runtime is the one PyTorch's own parallel loops use. */
static void run_on_threads(loop_t *loop, int threads) {
#pragma omp parallel num_threads(threads)
  loop_worker(loop);
}
#else
/* run_on_threads: loop_worker on up to `threads` threads started here (the caller's among them). */
static void run_on_threads(loop_t *loop, int threads) {
  pthread_t ids[SFX_MAX_THREADS];
  int started = 0;
  if (threads > SFX_MAX_THREADS) threads = SFX_MAX_THREADS;
  for (int t = 1; t < threads; t++) {
    if (pthread_create(&ids[started], NULL, loop_worker, loop) != 0) break; /* fewer threads: still correct */
    started++;
  }
  loop_worker(loop);
  for (int t = 0; t < started; t++) pthread_join(ids[t], NULL);
}
#endif

/* parallel_for: run(ctx, i) for i in [0, total) on up to `threads` threads (the caller's among them). */
static void parallel_for(int64_t total, void (*run)(void *, int64_t), void *ctx, int threads) {
  loop_t loop = {run, ctx, total, 0};
  if (threads > total) threads = (int)total;
  if (threads <= 1)
    loop_worker(&loop);
  else
    run_on_threads(&loop, threads);
}

static void run_chunk_of(void *job, int64_t c) { run_chunk((job_t *)job, c); }
static void run_group_of(void *job, int64_t g) { run_group((job_t *)job, g); }

int sfx_topk(const int64_t *seg, int64_t nseg, int64_t *groups, int64_t ngroups, int threads) {
  job_t job;
  memset(&job, 0, sizeof job);
  job.seg = seg;
  job.nseg = nseg;
  job.groups = groups;
  job.ngroups = ngroups;
  for (int64_t r = 0; r < nseg; r++) job.nchunks += (seg[SEG_COLS * r + 4] + SFX_CHUNK - 1) / SFX_CHUNK;
  int64_t *table = malloc((size_t)(6 * job.nchunks + ngroups + 1) * sizeof(int64_t));
  if (!table) return -1;
  job.chunk_seg = table;
  job.chunk_start = table + job.nchunks;
  job.chunk_len = table + 2 * job.nchunks;
  job.chunk_region = table + 3 * job.nchunks;
  job.chunk_above = table + 4 * job.nchunks;
  job.chunk_band = table + 5 * job.nchunks;
  job.group_first_chunk = table + 6 * job.nchunks;
  int64_t c = 0, region = 0, group = -1;
  for (int64_t r = 0; r < nseg; r++) {
    int64_t n = seg[SEG_COLS * r + 4];
    while (group < seg[SEG_COLS * r + 5]) job.group_first_chunk[++group] = c;
    for (int64_t start = 0; start < n; start += SFX_CHUNK, c++) {
      job.chunk_seg[c] = r;
      job.chunk_start[c] = start;
      job.chunk_len[c] = chunk_len(n, start);
      job.chunk_region[c] = region;
      region += region_cap(job.chunk_len[c]);
    }
  }
  while (group < ngroups) job.group_first_chunk[++group] = c;
  job.regions = malloc((size_t)(region ? region : 1) * sizeof(uint32_t));
  if (!job.regions) {
    free(table);
    return -1;
  }
  parallel_for(job.nchunks, run_chunk_of, &job, threads);
  parallel_for(job.ngroups, run_group_of, &job, threads);
  free(job.regions);
  free(table);
  int failed = 0;
  for (int64_t g = 0; g < ngroups; g++) failed |= groups[GROUP_COLS * g + 3] < 0;
  return failed ? -1 : 0;
}

/* sfx_straight_through: the score gradient of edge-popup, out = g * w * sign(s), for n float32 entries.
 * w * sign(s) is exact (w with s's sign bit, or 0 where s = +-0), so out[i] is the single rounding of a product,
 * bit for bit what torch.sign(s) * w * g gives, up to the sign of zero results (and like torch.sign, a NaN
 * score counts as 0), and but for an infinite weight under a zero score (0 * g here, NaN there).
 * signed_grad: one entry, w * sign(s) the bits of w with s's sign folded in (0 where s is +-0 or NaN). */
static inline float signed_grad(float g, uint32_t x, uint32_t w) {
  uint32_t m = x & 0x7fffffffu;
  uint32_t ws = (w ^ (x & 0x80000000u)) & (0u - (uint32_t)((m != 0) & (m <= 0x7f800000u)));
  float f;
  memcpy(&f, &ws, sizeof f);
  return g * f;
}

typedef struct {
  const float *g;
  const uint32_t *s, *w;
  float *out;
  int64_t n;
} grad_job_t;

SFX_CLONES
static void straight_through_range(const float *restrict g, const uint32_t *restrict s, const uint32_t *restrict w,
                                   float *restrict out, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = signed_grad(g[i], s[i], w[i]);
}

static void grad_chunk(void *arg, int64_t c) {
  const grad_job_t *job = (const grad_job_t *)arg;
  int64_t start = c * SFX_CHUNK, len = chunk_len(job->n, start);
  straight_through_range(job->g + start, job->s + start, job->w + start, job->out + start, len);
}

void sfx_straight_through(const float *g, const float *s, const float *w, float *out, int64_t n, int threads) {
  grad_job_t job = {g, (const uint32_t *)s, (const uint32_t *)w, out, n};
  parallel_for((n + SFX_CHUNK - 1) / SFX_CHUNK, grad_chunk, &job, threads);
}

/* sfx_apply_mask: out = mask ? w : 0 for n float32 weights and bool (0/1 byte) masks: w * mask, bit for bit
 * (a product with 1 or 0, except that w * 0 keeps w's sign: -0.0 for negative w, here +0.0; equal as numbers). */
typedef struct {
  const uint32_t *w;
  const uint8_t *mask;
  uint32_t *out;
  int64_t n;
} mask_job_t;

SFX_CLONES
static void apply_mask_range(const uint32_t *restrict w, const uint8_t *restrict mask, uint32_t *restrict out,
                             int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = w[i] & (0u - (uint32_t)(mask[i] != 0));
}

static void mask_chunk(void *arg, int64_t c) {
  const mask_job_t *job = (const mask_job_t *)arg;
  int64_t start = c * SFX_CHUNK, len = chunk_len(job->n, start);
  apply_mask_range(job->w + start, job->mask + start, job->out + start, len);
}

void sfx_apply_mask(const float *w, const uint8_t *mask, float *out, int64_t n, int threads) {
  mask_job_t job = {(const uint32_t *)w, mask, (uint32_t *)out, n};
  parallel_for((n + SFX_CHUNK - 1) / SFX_CHUNK, mask_chunk, &job, threads);
}

/* sfx_apply_bits: out = bit ? w : 0, as sfx_apply_mask for a bit mask. sfx_unpack_bits: out[i] = bit i (0/1
 * bytes: a bool tensor). Chunks start at multiples of SFX_CHUNK, hence of 64: each thread owns whole words. */
typedef struct {
  const uint32_t *w;
  const uint64_t *bits;
  uint32_t *out;
  uint8_t *out_bool;
  int64_t n;
} bits_job_t;

/* Both work a word at a time, each half-word tested against BIT[j] (a per-entry variable shift of a 64-bit word
 * ran at half the speed of a copy). */
SFX_CLONES
static void apply_bits_range(const uint32_t *restrict w, const uint64_t *restrict bits, uint32_t *restrict out,
                             int64_t n) {
  int64_t words = n >> 6;
  for (int64_t k = 0; k < words; k++) {
    const uint32_t *wb = w + 64 * k;
    uint32_t *ob = out + 64 * k, lo = (uint32_t)bits[k], hi = (uint32_t)(bits[k] >> 32);
    for (int j = 0; j < 32; j++) ob[j] = wb[j] & (0u - (uint32_t)((lo & BIT[j]) != 0));
    for (int j = 0; j < 32; j++) ob[32 + j] = wb[32 + j] & (0u - (uint32_t)((hi & BIT[j]) != 0));
  }
  for (int64_t i = words << 6; i < n; i++) out[i] = w[i] & (0u - (uint32_t)((bits[i >> 6] >> (i & 63)) & 1u));
}

SFX_CLONES
static void unpack_bits_range(const uint64_t *restrict bits, uint8_t *restrict out, int64_t n) {
  int64_t words = n >> 6;
  for (int64_t k = 0; k < words; k++) {
    uint8_t *ob = out + 64 * k;
    uint32_t lo = (uint32_t)bits[k], hi = (uint32_t)(bits[k] >> 32);
    for (int j = 0; j < 32; j++) ob[j] = (uint8_t)((lo & BIT[j]) != 0);
    for (int j = 0; j < 32; j++) ob[32 + j] = (uint8_t)((hi & BIT[j]) != 0);
  }
  for (int64_t i = words << 6; i < n; i++) out[i] = (uint8_t)((bits[i >> 6] >> (i & 63)) & 1u);
}

static void bits_chunk(void *arg, int64_t c) {
  const bits_job_t *job = (const bits_job_t *)arg;
  int64_t start = c * SFX_CHUNK, len = chunk_len(job->n, start);
  if (job->out) apply_bits_range(job->w + start, job->bits + (start >> 6), job->out + start, len);
  else unpack_bits_range(job->bits + (start >> 6), job->out_bool + start, len);
}

void sfx_apply_bits(const float *w, const uint64_t *bits, float *out, int64_t n, int threads) {
  bits_job_t job = {(const uint32_t *)w, bits, (uint32_t *)out, NULL, n};
  parallel_for((n + SFX_CHUNK - 1) / SFX_CHUNK, bits_chunk, &job, threads);
}

void sfx_unpack_bits(const uint64_t *bits, uint8_t *out, int64_t n, int threads) {
  bits_job_t job = {NULL, bits, NULL, out, n};
  parallel_for((n + SFX_CHUNK - 1) / SFX_CHUNK, bits_chunk, &job, threads);
}

/* The same two passes for a weight held as sign bits and one magnitude c (core/packed.py's PackedSigns): entry i
 * is +c where bit i % 8 of byte signs[i / 8] is set, else -c (so a word of 8 bytes read little-endian holds entries
 * 64k .. 64k + 63, the layout of a bit mask). The float weight is never read: sfx_apply_signs writes w * mask from
 * two bits per entry, sfx_straight_through_signs computes sfx_straight_through's values with w[i] = +-c. pos is
 * the bit pattern of +c (c > 0, finite); the caller fixes rows it holds as zeros (PackedSigns.zero_rows). */
typedef struct {
  const uint8_t *signs;
  const uint64_t *mask; /* sfx_apply_signs */
  const float *g;       /* sfx_straight_through_signs (neither: sfx_expand_signs) */
  const uint32_t *s;
  uint32_t pos, *out;
  int64_t n;
} signs_job_t;

/* Bytes p[0..7] as a word, byte j in bits 8j..8j+7 (the compiler makes it one load on a little-endian machine). */
static uint64_t load_word(const uint8_t *p) {
  uint64_t v = 0;
  for (int j = 0; j < 8; j++) v |= (uint64_t)p[j] << (8 * j);
  return v;
}

/* The weight's bits of entry i of a word: pos, with the sign bit set where the sign bit of the entry is clear. */
#define SIGNED_C(pos, half, j) ((pos) | ((uint32_t)(((half) & BIT[j]) == 0) << 31))

SFX_CLONES
static void apply_signs_range(const uint8_t *restrict signs, const uint64_t *restrict mask, uint32_t pos,
                              uint32_t *restrict out, int64_t n) {
  int64_t words = n >> 6;
  for (int64_t k = 0; k < words; k++) {
    uint64_t sw = load_word(signs + 8 * k), mw = mask[k];
    uint32_t slo = (uint32_t)sw, shi = (uint32_t)(sw >> 32), mlo = (uint32_t)mw, mhi = (uint32_t)(mw >> 32);
    uint32_t *ob = out + 64 * k;
    for (int j = 0; j < 32; j++) ob[j] = SIGNED_C(pos, slo, j) & (0u - (uint32_t)((mlo & BIT[j]) != 0));
    for (int j = 0; j < 32; j++) ob[32 + j] = SIGNED_C(pos, shi, j) & (0u - (uint32_t)((mhi & BIT[j]) != 0));
  }
  for (int64_t i = words << 6; i < n; i++) {
    uint32_t w = pos | ((uint32_t)(((signs[i >> 3] >> (i & 7)) & 1u) == 0) << 31);
    out[i] = w & (0u - (uint32_t)((mask[i >> 6] >> (i & 63)) & 1u));
  }
}

SFX_CLONES
static void straight_through_signs_range(const float *restrict g, const uint32_t *restrict s,
                                         const uint8_t *restrict signs, uint32_t pos, float *restrict out, int64_t n) {
  int64_t words = n >> 6;
  for (int64_t k = 0; k < words; k++) {
    uint64_t sw = load_word(signs + 8 * k);
    uint32_t lo = (uint32_t)sw, hi = (uint32_t)(sw >> 32);
    const float *gb = g + 64 * k;
    const uint32_t *xb = s + 64 * k;
    float *ob = out + 64 * k;
    for (int j = 0; j < 32; j++) ob[j] = signed_grad(gb[j], xb[j], SIGNED_C(pos, lo, j));
    for (int j = 0; j < 32; j++) ob[32 + j] = signed_grad(gb[32 + j], xb[32 + j], SIGNED_C(pos, hi, j));
  }
  for (int64_t i = words << 6; i < n; i++) {
    uint32_t w = pos | ((uint32_t)(((signs[i >> 3] >> (i & 7)) & 1u) == 0) << 31);
    out[i] = signed_grad(g[i], s[i], w);
  }
}

/* sfx_expand_signs: the weight itself, out[i] = +-c. */
SFX_CLONES
static void expand_signs_range(const uint8_t *restrict signs, uint32_t pos, uint32_t *restrict out, int64_t n) {
  int64_t words = n >> 6;
  for (int64_t k = 0; k < words; k++) {
    uint64_t sw = load_word(signs + 8 * k);
    uint32_t lo = (uint32_t)sw, hi = (uint32_t)(sw >> 32), *ob = out + 64 * k;
    for (int j = 0; j < 32; j++) ob[j] = SIGNED_C(pos, lo, j);
    for (int j = 0; j < 32; j++) ob[32 + j] = SIGNED_C(pos, hi, j);
  }
  for (int64_t i = words << 6; i < n; i++) out[i] = pos | ((uint32_t)(((signs[i >> 3] >> (i & 7)) & 1u) == 0) << 31);
}

static void signs_chunk(void *arg, int64_t c) {
  const signs_job_t *job = (const signs_job_t *)arg;
  int64_t start = c * SFX_CHUNK, len = chunk_len(job->n, start);
  if (job->mask)
    apply_signs_range(job->signs + (start >> 3), job->mask + (start >> 6), job->pos, job->out + start, len);
  else if (job->g)
    straight_through_signs_range(job->g + start, job->s + start, job->signs + (start >> 3), job->pos,
                                 (float *)job->out + start, len);
  else
    expand_signs_range(job->signs + (start >> 3), job->pos, job->out + start, len);
}

void sfx_apply_signs(const uint8_t *signs, float c, const uint64_t *mask, float *out, int64_t n, int threads) {
  signs_job_t job = {signs, mask, NULL, NULL, 0, (uint32_t *)out, n};
  memcpy(&job.pos, &c, sizeof c);
  parallel_for((n + SFX_CHUNK - 1) / SFX_CHUNK, signs_chunk, &job, threads);
}

void sfx_straight_through_signs(const float *g, const float *s, const uint8_t *signs, float c, float *out, int64_t n,
                                int threads) {
  signs_job_t job = {signs, NULL, g, (const uint32_t *)s, 0, (uint32_t *)out, n};
  memcpy(&job.pos, &c, sizeof c);
  parallel_for((n + SFX_CHUNK - 1) / SFX_CHUNK, signs_chunk, &job, threads);
}

void sfx_expand_signs(const uint8_t *signs, float c, float *out, int64_t n, int threads) {
  signs_job_t job = {signs, NULL, NULL, NULL, 0, (uint32_t *)out, n};
  memcpy(&job.pos, &c, sizeof c);
  parallel_for((n + SFX_CHUNK - 1) / SFX_CHUNK, signs_chunk, &job, threads);
}

/* sfx_pack_signs: the sign bits of a float32 weight of `rows` rows of `width` entries that holds one magnitude
 * (core/packed.py's rule): every row is either all zeros (+-0; row_zero[r] = 1) or all +-c, with c the magnitude of
 * the first nonzero entry (1 when there is none; written to *scale). signs gets bit i = (w[i] > 0), in
 * PackedSigns' layout. Threads take blocks of whole rows, a multiple of 8 of them, so that each block starts on a
 * byte: the rows are checked first (a read the compiler vectorises), then the block's bytes are written (the
 * block, at most about 2^18 entries, read again from cache). Returns 0, or 1 when some entry breaks the rule (a NaN,
 * another magnitude, a row mixing zeros and +-c); the bits are then not all written. */
typedef struct {
  const float *w;
  int64_t rows, width, block_rows;
  float c;
  uint8_t *signs, *row_zero;
  int bad;
} pack_job_t;

SFX_CLONES
static int check_rows(const float *restrict w, int64_t nrows, int64_t width, float c, uint8_t *restrict row_zero) {
  int bad = 0;
  for (int64_t r = 0; r < nrows; r++) {
    const float *row = w + r * width;
    int64_t zeros = 0, live = 0;
    for (int64_t k = 0; k < width; k++) {
      zeros += row[k] == 0.0f;
      live += (row[k] == c) | (row[k] == -c);
    }
    row_zero[r] = (uint8_t)(zeros == width);
    bad |= zeros != width && live != width;
  }
  return bad;
}

SFX_CLONES
static void signs_to_bytes(const float *restrict w, int64_t n, uint8_t *restrict out) {
  int64_t bytes = n >> 3;
  for (int64_t b = 0; b < bytes; b++) {
    uint32_t byte = 0;
    for (int j = 0; j < 8; j++) byte |= (uint32_t)(w[8 * b + j] > 0.0f) << j;
    out[b] = (uint8_t)byte;
  }
  if (n & 7) {
    uint32_t byte = 0;
    for (int64_t i = bytes << 3; i < n; i++) byte |= (uint32_t)(w[i] > 0.0f) << (i & 7);
    out[bytes] = (uint8_t)byte;
  }
}

static void pack_block(void *arg, int64_t b) {
  pack_job_t *job = (pack_job_t *)arg;
  int64_t r0 = b * job->block_rows, r1 = r0 + job->block_rows < job->rows ? r0 + job->block_rows : job->rows;
  const float *w = job->w + r0 * job->width;
  if (check_rows(w, r1 - r0, job->width, job->c, job->row_zero + r0)) {
    __atomic_store_n(&job->bad, 1, __ATOMIC_RELAXED);
    return;
  }
  signs_to_bytes(w, (r1 - r0) * job->width, job->signs + ((r0 * job->width) >> 3));
}

int sfx_pack_signs(const float *w, int64_t rows, int64_t width, float *scale, uint8_t *signs, uint8_t *row_zero,
                   int threads) {
  int64_t n = rows * width, first = 0;
  while (first < n && w[first] == 0.0f) first++;
  pack_job_t job = {w, rows, width, 8, 1.0f, signs, row_zero, 0};
  if (first < n) {
    uint32_t bits;
    memcpy(&bits, &w[first], sizeof bits);
    bits &= 0x7fffffffu; /* |w[first]| */
    memcpy(&job.c, &bits, sizeof bits);
  }
  while (job.block_rows * width < ((int64_t)1 << 18) && job.block_rows < rows) job.block_rows *= 2;
  *scale = job.c;
  parallel_for((rows + job.block_rows - 1) / job.block_rows, pack_block, &job, threads);
  return job.bad;
}
