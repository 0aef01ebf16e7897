/*
 * On-media layout of the qsnap workload: what a memory page and a disk record hold.
 *
 * Everything is little-endian (x86_64) and a pure function of a few numbers, so a host
 * tool that reads guest RAM or the disk image can recompute the expected bytes:
 *   memory page  = header(run_id, epoch, j, page) + fill(page_seed(run_id, epoch, page))
 *   disk record  = header(run_id, seq, nonce, slot) + fill(record_seed(nonce)) + checksum
 */
#ifndef QSNAP_LAYOUT_H
#define QSNAP_LAYOUT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define QSNAP_PAGE 4096u

#define QSNAP_PAGE_MAGIC "QSNAPPG" /* 8 bytes with the NUL */
#define QSNAP_REC_MAGIC "QSNAPRC"

struct qsnap_page_hdr {
  char magic[8];
  uint64_t run_id;
  uint32_t epoch;
  uint32_t j;      /* position of this page in the write order: perm[j] == page */
  uint32_t page;   /* index of this page in the buffer */
  uint32_t npages; /* N */
};

struct qsnap_rec_hdr {
  char magic[8];
  uint64_t run_id;
  uint64_t seq;
  uint64_t nonce;
  uint32_t slot; /* seq % slots */
  uint32_t slots;
  uint64_t checksum; /* qsnap_checksum() of the record: every word but this one */
};

_Static_assert(sizeof(struct qsnap_page_hdr) == 32, "page header is 32 bytes");
_Static_assert(sizeof(struct qsnap_rec_hdr) == 48, "record header is 48 bytes");

#define QSNAP_PAGE_BODY_WORDS ((QSNAP_PAGE - sizeof(struct qsnap_page_hdr)) / 8)
#define QSNAP_REC_BODY_WORDS ((QSNAP_PAGE - sizeof(struct qsnap_rec_hdr)) / 8)

static inline uint64_t qsnap_splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static inline uint64_t qsnap_page_seed(uint64_t run_id, uint32_t epoch, uint32_t page) {
  uint64_t s = run_id ^ ((uint64_t)epoch << 32 | page);
  return qsnap_splitmix64(&s) | 1; /* xorshift state must not be 0 */
}

static inline uint64_t qsnap_record_seed(uint64_t nonce) {
  uint64_t s = nonce ^ 0x5153524543ull;
  return qsnap_splitmix64(&s) | 1;
}

/* xorshift64 (Marsaglia): cheap under TCG, and every word depends on its position. */
static inline uint64_t qsnap_next(uint64_t *x) {
  uint64_t v = *x;
  v ^= v << 13;
  v ^= v >> 7;
  v ^= v << 17;
  return *x = v;
}

static inline void qsnap_fill(uint64_t *words, uint64_t n, uint64_t seed) {
  uint64_t x = seed;
  for (uint64_t i = 0; i < n; i++) words[i] = qsnap_next(&x);
}

/* Index of the first word that differs from the fill, or n if all match. */
static inline uint64_t qsnap_fill_mismatch(const uint64_t *words, uint64_t n, uint64_t seed) {
  uint64_t x = seed;
  for (uint64_t i = 0; i < n; i++)
    if (words[i] != qsnap_next(&x)) return i;
  return n;
}

#define QSNAP_REC_CHECKSUM_WORD (offsetof(struct qsnap_rec_hdr, checksum) / 8)

static inline uint64_t qsnap_checksum(const void *rec) {
  const uint64_t *w = rec;
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint64_t i = 0; i < QSNAP_PAGE / 8; i++) {
    if (i == QSNAP_REC_CHECKSUM_WORD) continue;
    h = (h ^ w[i]) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  return h;
}

#endif
