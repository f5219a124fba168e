/* Fused passes of the CPU "band" top-k strategy (supermask_fx/topk.py), for float32 scores and weights.
 *
 * The scores of one selector are a list of segments (one per layer; several under scope="global"), each given
 * by a row of a table of int64: [scores, weight, mask, effective, signed, n] (pointers as integers; effective
 * and signed may be 0: not written; signed only with effective). Magnitudes are compared as integer bit
 * patterns, |s| = bits & 0x7fffffff, which order like the non-negative floats they encode.
 *
 * Segments are cut into chunks of SFX_CHUNK entries, numbered segment by segment; chunk c owns a region of
 * cap(c) = ceil(len(c) / 8) slots in a caller-owned int64 scratch (sfx_band_capacity slots in all).
 *
 * sfx_band_pass     one read of the scores: mask = |s| >= hi, effective = mask ? w : 0, signed = w * sign(s)
 *                   (0 where s = +-0); counts per segment of |s| >= hi and of lo <= |s| < hi; per chunk, the
 *                   band count, and the band entries' flat indices (within the segment) in its scratch region
 *                   when they fit (a band over 1/8 of a chunk is rare: early steps, a far-off hint).
 * sfx_band_collect  gathers the band indices, segment after segment in index order, into one array: copies
 *                   the regions, and scans again only the chunks whose band did not fit.
 *
 * Threads: plain pthreads (no second OpenMP runtime next to PyTorch's); chunks are handed out by an atomic
 * counter. Inner loops are branch-free integer code over blocks of 64 entries, so the compiler vectorises them;
 * band entries are then found a 64-bit word at a time. target_clones adds an AVX2 copy chosen at load time.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define SFX_CHUNK ((int64_t)1 << 18)
#define SFX_MAX_THREADS 256

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SFX_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SFX_CLONES
#endif

static int64_t chunks_of(int64_t n) { return (n + SFX_CHUNK - 1) / SFX_CHUNK; }

int64_t sfx_chunk_count(const int64_t *table, int64_t nseg) {
  int64_t total = 0;
  for (int64_t g = 0; g < nseg; g++) total += chunks_of(table[6 * g + 5]);
  return total;
}

int64_t sfx_band_capacity(const int64_t *table, int64_t nseg) {
  int64_t total = 0;
  for (int64_t g = 0; g < nseg; g++) total += (table[6 * g + 5] + 7) / 8 + chunks_of(table[6 * g + 5]);
  return total;
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

/* One chunk: mask (+ effective, signed) for entries [0, n), band indices (offset by first) into out up to cap.
 * Returns the band count (which may exceed cap: then out holds only the first cap). */
SFX_CLONES
static int64_t pass_range(const uint32_t *restrict s, const uint32_t *restrict w, int64_t n, uint32_t lo,
                          uint32_t hi, uint8_t *restrict mask, uint32_t *restrict eff, uint32_t *restrict sgn,
                          int64_t first, int64_t *restrict out, int64_t cap, int64_t *above) {
  uint8_t flags[64];
  int64_t up_total = 0, band = 0;
  for (int64_t base = 0; base < n; base += 64) {
    int width = n - base < 64 ? (int)(n - base) : 64;
    const uint32_t *sb = s + base;
    uint8_t *mb = mask + base;
    uint32_t ups = 0;
    if (width < 64) memset(flags, 0, sizeof flags);
    if (eff && sgn) {
      const uint32_t *wb = w + base;
      uint32_t *eb = eff + base, *gb = sgn + base;
      for (int j = 0; j < width; j++) {
        uint32_t x = sb[j], m = x & 0x7fffffffu, wi = wb[j];
        uint32_t up = m >= hi;
        ups += up;
        flags[j] = (uint8_t)((m >= lo) ^ up);
        mb[j] = (uint8_t)up;
        eb[j] = wi & (0u - up);
        gb[j] = (wi ^ (x & 0x80000000u)) & (0u - (uint32_t)(m != 0));
      }
    } else if (eff) {
      const uint32_t *wb = w + base;
      uint32_t *eb = eff + base;
      for (int j = 0; j < width; j++) {
        uint32_t m = sb[j] & 0x7fffffffu;
        uint32_t up = m >= hi;
        ups += up;
        flags[j] = (uint8_t)((m >= lo) ^ up);
        mb[j] = (uint8_t)up;
        eb[j] = wb[j] & (0u - up);
      }
    } else {
      for (int j = 0; j < width; j++) {
        uint32_t m = sb[j] & 0x7fffffffu;
        uint32_t up = m >= hi;
        ups += up;
        flags[j] = (uint8_t)((m >= lo) ^ up);
        mb[j] = (uint8_t)up;
      }
    }
    up_total += ups;
    for (uint64_t word = pack_flags(flags); word; word &= word - 1) {
      if (band < cap) out[band] = first + base + __builtin_ctzll(word);
      band++;
    }
  }
  *above = up_total;
  return band;
}

/* The band indices of entries [0, n) (offset by first), for chunks whose band did not fit their region. */
SFX_CLONES
static void collect_range(const uint32_t *restrict s, int64_t n, uint32_t lo, uint32_t hi, int64_t first,
                          int64_t *restrict out) {
  uint8_t flags[64];
  for (int64_t base = 0; base < n; base += 64) {
    int width = n - base < 64 ? (int)(n - base) : 64;
    if (width < 64) memset(flags, 0, sizeof flags);
    for (int j = 0; j < width; j++) {
      uint32_t m = s[base + j] & 0x7fffffffu;
      flags[j] = (uint8_t)((m >= lo) & (m < hi));
    }
    for (uint64_t word = pack_flags(flags); word; word &= word - 1) *out++ = first + base + __builtin_ctzll(word);
  }
}

typedef struct {
  const int64_t *table;
  int64_t nchunks;
  uint32_t lo, hi;
  int64_t *seg_counts; /* nseg x 2: above, band */
  int64_t *chunk_band; /* nchunks */
  int64_t *scratch;    /* sfx_band_capacity */
  int64_t *out;        /* collect only: sum of the band counts */
  int64_t *chunk_out;  /* collect only: nchunks, where each chunk's indices go in out */
  int64_t next;        /* atomic chunk counter */
  int collect;
} job_t;

/* Chunk c -> segment, start, length, and its scratch region. Chunks are numbered segment by segment. */
static void locate(const job_t *job, int64_t c, int64_t *seg, int64_t *start, int64_t *len, int64_t *region,
                   int64_t *cap) {
  int64_t g = 0, offset = 0;
  for (;;) {
    int64_t n = job->table[6 * g + 5], k = chunks_of(n);
    if (c < k) {
      *seg = g;
      *start = c * SFX_CHUNK;
      *len = n - *start < SFX_CHUNK ? n - *start : SFX_CHUNK;
      *region = offset + c * (SFX_CHUNK / 8 + 1);
      *cap = (*len + 7) / 8;
      return;
    }
    offset += (n + 7) / 8 + k;
    c -= k;
    g++;
  }
}

static void run_chunk(job_t *job, int64_t c) {
  int64_t g, start, len, region, cap;
  locate(job, c, &g, &start, &len, &region, &cap);
  const int64_t *row = job->table + 6 * g;
  const uint32_t *s = (const uint32_t *)(intptr_t)row[0];
  if (job->collect) {
    int64_t count = job->chunk_band[c];
    if (count == 0) return;
    int64_t *out = job->out + job->chunk_out[c];
    if (count <= cap)
      memcpy(out, job->scratch + region, (size_t)count * sizeof(int64_t));
    else
      collect_range(s + start, len, job->lo, job->hi, start, out);
    return;
  }
  const uint32_t *w = (const uint32_t *)(intptr_t)row[1];
  uint8_t *mask = (uint8_t *)(intptr_t)row[2] + start;
  uint32_t *eff = row[3] ? (uint32_t *)(intptr_t)row[3] + start : NULL;
  uint32_t *sgn = row[3] && row[4] ? (uint32_t *)(intptr_t)row[4] + start : NULL;
  int64_t above;
  int64_t band = pass_range(s + start, w + start, len, job->lo, job->hi, mask, eff, sgn, start,
                            job->scratch + region, cap, &above);
  job->chunk_band[c] = band;
  __atomic_fetch_add(&job->seg_counts[2 * g], above, __ATOMIC_RELAXED);
  __atomic_fetch_add(&job->seg_counts[2 * g + 1], band, __ATOMIC_RELAXED);
}

static void *worker(void *arg) {
  job_t *job = (job_t *)arg;
  for (;;) {
    int64_t c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
    if (c >= job->nchunks) return NULL;
    run_chunk(job, c);
  }
}

static void run_job(job_t *job, int threads) {
  pthread_t ids[SFX_MAX_THREADS];
  int started = 0;
  if (threads > job->nchunks) threads = (int)job->nchunks;
  if (threads > SFX_MAX_THREADS) threads = SFX_MAX_THREADS;
  for (int t = 1; t < threads; t++) {
    if (pthread_create(&ids[started], NULL, worker, job) != 0) break; /* fewer threads: still correct */
    started++;
  }
  worker(job);
  for (int t = 0; t < started; t++) pthread_join(ids[t], NULL);
}

/* seg_counts (nseg x 2), chunk_band (sfx_chunk_count) and scratch (sfx_band_capacity) are overwritten. */
void sfx_band_pass(const int64_t *table, int64_t nseg, uint32_t lo, uint32_t hi, int64_t *seg_counts,
                   int64_t *chunk_band, int64_t *scratch, int threads) {
  job_t job;
  memset(&job, 0, sizeof job);
  memset(seg_counts, 0, (size_t)nseg * 2 * sizeof(int64_t));
  job.table = table;
  job.nchunks = sfx_chunk_count(table, nseg);
  job.lo = lo;
  job.hi = hi;
  job.seg_counts = seg_counts;
  job.chunk_band = chunk_band;
  job.scratch = scratch;
  run_job(&job, threads);
}

/* After sfx_band_pass with the same table, lo, hi: out (the sum of the band counts) receives the indices;
 * chunk_out (sfx_chunk_count entries) is scratch. */
void sfx_band_collect(const int64_t *table, int64_t nseg, uint32_t lo, uint32_t hi, const int64_t *chunk_band,
                      const int64_t *scratch, int64_t *chunk_out, int64_t *out, int threads) {
  job_t job;
  memset(&job, 0, sizeof job);
  job.table = table;
  job.nchunks = sfx_chunk_count(table, nseg);
  job.lo = lo;
  job.hi = hi;
  job.chunk_band = (int64_t *)chunk_band;
  job.scratch = (int64_t *)scratch;
  job.chunk_out = chunk_out;
  job.out = out;
  job.collect = 1;
  int64_t offset = 0;
  for (int64_t c = 0; c < job.nchunks; c++) {
    chunk_out[c] = offset;
    offset += chunk_band[c];
  }
  run_job(&job, threads);
}
