/*
 * qsnap-workload: the guest program every snapshot test measures against.
 *
 * It keeps an invariant over memory, CPU state and disk together that only a true
 * point-in-time snapshot preserves, and checks it on request over the serial console.
 *
 * Memory: N pages; a fixed permutation perm. Epoch e rewrites pages perm[0..N-1] in turn;
 * progress (e, j) is in memory. Between pages: perm[j'] carries epoch e for j' < j and
 * epoch e-1 otherwise, and every byte matches its pattern (layout.h).
 *
 * Disk: a ring of `slots` 4 KiB records written with O_DIRECT, seq s to slot s % slots,
 * each with a fresh random nonce (a write re-executed after a restore differs). Memory
 * holds the acked count A and the nonce last written to each slot. Between writes: slot
 * i holds the record of the largest s < A with s = i (mod slots), with that nonce, or no
 * record of this run if there is none; record A may also be present while it is in flight.
 *
 * A snapshot whose disk is older than its RAM loses acked records; a newer disk has
 * records from the future; RAM pages from different instants break the epoch split.
 *
 * The writers also verify what they are about to overwrite (page header and two body
 * words; the whole disk record). A snapshot inconsistency would otherwise be erased by
 * the writers before the host gets to send `check`; these failures are latched.
 *
 * Console protocol: see usage(); the host side is src/guest/console.ts.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#include "layout.h"

#define HOLD_TIMEOUT_S 30
#define CHECK_CHUNK_SLOTS 256u /* 1 MiB per O_DIRECT read */

/* ---- configuration and shared state ---------------------------------------------- */

static uint64_t g_run_id;
static uint32_t g_npages;
static uint8_t *g_mem;
static uint32_t *g_perm, *g_invperm;

static int g_disk_fd = -1;
static const char *g_disk_name = "none";
static uint32_t g_slots;
static uint64_t *g_slot_nonce;         /* nonce of the last acked write to each slot */
static uint8_t *g_wbuf, *g_rbuf;        /* disk writer's O_DIRECT buffers */
static uint8_t *g_check_buf;            /* main thread's O_DIRECT buffer */

/* Memory progress, packed so that a reader never sees a torn (e, j): e << 32 | j. */
static _Atomic uint64_t g_mem_progress;
static _Atomic uint64_t g_mem_pages_written;
static _Atomic uint64_t g_acked;        /* A */
static _Atomic int g_inflight;          /* record A is being written */
static _Atomic uint64_t g_inflight_nonce;

enum { W_MEM, W_DISK, W_COUNT };
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv;
static _Atomic int g_hold;
static bool g_parked[W_COUNT];
static bool g_disk_dead;

/* A failure: reason plus detail "key=value ..." — the first one is kept, all are counted. */
struct failures {
  uint64_t count;
  char first[200];
};
static struct failures g_latched; /* found by the writers; guarded by g_mu */

static void add_failure(struct failures *f, const char *at, const char *reason, const char *fmt, ...) {
  if (f->count++ > 0) return;
  char detail[160];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof detail, fmt, ap);
  va_end(ap);
  snprintf(f->first, sizeof f->first, "reason=%s %s at=%s", reason, detail, at);
}

/* Adds failures a writer found to the latched ones. */
static void latch(const struct failures *f) {
  if (!f->count) return;
  pthread_mutex_lock(&g_mu);
  if (g_latched.count == 0) memcpy(g_latched.first, f->first, sizeof f->first);
  g_latched.count += f->count;
  pthread_mutex_unlock(&g_mu);
}

/* ---- output ---------------------------------------------------------------------- */

static void emit(const char *fmt, ...) {
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (n > (int)sizeof line - 2) n = sizeof line - 2;
  line[n++] = '\n';
  for (int off = 0; off < n;) {
    ssize_t w = write(STDOUT_FILENO, line + off, n - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    off += w;
  }
}

static _Noreturn void fatal(const char *fmt, ...) {
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  emit("QSNAP-FATAL %s", msg);
  exit(1);
}

/* ---- randomness ------------------------------------------------------------------ */

static uint64_t random64(void) {
  uint64_t v = 0;
  /* GRND_INSECURE never blocks (early boot under TCG has little entropy). */
  if (getrandom(&v, sizeof v, GRND_INSECURE) != sizeof v &&
      getrandom(&v, sizeof v, GRND_NONBLOCK) != sizeof v) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    v = (uint64_t)ts.tv_nsec << 32 ^ (uint64_t)ts.tv_sec ^ (uint64_t)getpid();
  }
  return v;
}

/*
 * The kernel's RNG state is part of a snapshot too, so getrandom alone may repeat after
 * a restore; the TSC read at the moment of the write does not.
 */
static uint64_t fresh_nonce(uint64_t seq) {
  uint64_t s = random64() ^ __rdtsc() ^ seq * 0xd1342543de82ef95ull;
  return qsnap_splitmix64(&s);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- memory pages ---------------------------------------------------------------- */

static inline uint8_t *page_at(uint32_t p) { return g_mem + (size_t)p * QSNAP_PAGE; }

static void write_page(uint32_t p, uint32_t epoch, uint32_t j) {
  uint8_t *pg = page_at(p);
  struct qsnap_page_hdr h = {.run_id = g_run_id, .epoch = epoch, .j = j, .page = p, .npages = g_npages};
  memcpy(h.magic, QSNAP_PAGE_MAGIC, 8);
  memcpy(pg, &h, sizeof h);
  qsnap_fill((uint64_t *)(pg + sizeof h), QSNAP_PAGE_BODY_WORDS, qsnap_page_seed(g_run_id, epoch, p));
}

/* Header fields of page p against the expected epoch; returns false and records the first. */
static bool check_page_header(struct failures *f, const char *at, uint32_t p, uint32_t want) {
  const struct qsnap_page_hdr *h = (const void *)page_at(p);
  const char *field = memcmp(h->magic, QSNAP_PAGE_MAGIC, 8) ? "magic"
                      : h->run_id != g_run_id                ? "run"
                      : h->page != p                         ? "page"
                      : h->j != g_invperm[p]                 ? "j"
                      : h->npages != g_npages                ? "npages"
                                                             : NULL;
  if (field) {
    add_failure(f, at, "mem-header", "page=%" PRIu32 " field=%s", p, field);
    return false;
  }
  if (h->epoch != want) {
    add_failure(f, at, "mem-epoch", "page=%" PRIu32 " j=%" PRIu32 " want=%" PRIu32 " got=%" PRIu32, p,
                g_invperm[p], want, h->epoch);
    return false;
  }
  return true;
}

static void report_pattern(struct failures *f, const char *at, uint32_t p, uint32_t epoch, uint64_t word) {
  add_failure(f, at, "mem-pattern", "page=%" PRIu32 " offset=%zu epoch=%" PRIu32, p,
              sizeof(struct qsnap_page_hdr) + word * 8, epoch);
}

static void check_page(struct failures *f, uint32_t p, uint32_t want) {
  if (!check_page_header(f, "check", p, want)) return;
  const uint64_t *body = (const void *)(page_at(p) + sizeof(struct qsnap_page_hdr));
  uint64_t bad = qsnap_fill_mismatch(body, QSNAP_PAGE_BODY_WORDS, qsnap_page_seed(g_run_id, want, p));
  if (bad < QSNAP_PAGE_BODY_WORDS) report_pattern(f, "check", p, want, bad);
}

/* Before overwriting: the header and the first and last body words (full pages cost 2x). */
static void prewrite_check_page(uint32_t p, uint32_t want) {
  struct failures f = {0};
  if (check_page_header(&f, "write", p, want)) {
    const uint64_t *body = (const void *)(page_at(p) + sizeof(struct qsnap_page_hdr));
    uint64_t x = qsnap_page_seed(g_run_id, want, p);
    uint64_t first = qsnap_next(&x);
    if (body[0] != first) {
      report_pattern(&f, "write", p, want, 0);
    } else {
      for (uint64_t i = 1; i < QSNAP_PAGE_BODY_WORDS - 1; i++) qsnap_next(&x);
      if (body[QSNAP_PAGE_BODY_WORDS - 1] != qsnap_next(&x))
        report_pattern(&f, "write", p, want, QSNAP_PAGE_BODY_WORDS - 1);
    }
  }
  latch(&f);
}

/* ---- disk records ---------------------------------------------------------------- */

static void build_record(uint8_t *buf, uint64_t seq, uint64_t nonce) {
  struct qsnap_rec_hdr h = {
      .run_id = g_run_id, .seq = seq, .nonce = nonce, .slot = (uint32_t)(seq % g_slots), .slots = g_slots};
  memcpy(h.magic, QSNAP_REC_MAGIC, 8);
  memcpy(buf, &h, sizeof h);
  qsnap_fill((uint64_t *)(buf + sizeof h), QSNAP_REC_BODY_WORDS, qsnap_record_seed(nonce));
  uint64_t sum = qsnap_checksum(buf);
  memcpy(buf + offsetof(struct qsnap_rec_hdr, checksum), &sum, sizeof sum);
}

/*
 * What slot i must hold when A writes are acked: the largest s < A with s = i (mod slots)
 * and the nonce memory remembers for it. Returns false when no such s exists.
 */
static bool expected_seq(uint32_t i, uint64_t acked, uint64_t *seq) {
  if (acked <= i) return false;
  *seq = i + (acked - 1 - i) / g_slots * g_slots;
  return true;
}

/*
 * Verify one slot. `inflight_nonce` is used when record A may legitimately be there
 * (inflight set); the writers' safe points never have one in flight.
 */
static void check_slot(struct failures *f, const char *at, uint32_t i, const uint8_t *buf, uint64_t acked,
                       bool inflight, uint64_t inflight_nonce) {
  const struct qsnap_rec_hdr *h = (const void *)buf;
  uint64_t want = 0;
  bool has_want = expected_seq(i, acked, &want);
  bool ours = !memcmp(h->magic, QSNAP_REC_MAGIC, 8) && h->run_id == g_run_id;
  char want_s[24] = "none";
  if (has_want) snprintf(want_s, sizeof want_s, "%" PRIu64, want);

  if (!ours) {
    if (has_want) add_failure(f, at, "disk-missing", "slot=%" PRIu32 " want=%s got=none", i, want_s);
    return;
  }
  if (h->seq % g_slots != i || h->slot != i || h->slots != g_slots) {
    add_failure(f, at, "disk-slot", "slot=%" PRIu32 " want=%s got=%" PRIu64, i, want_s, h->seq);
    return;
  }
  uint64_t nonce = g_slot_nonce[i];
  if (inflight && h->seq == acked) {
    nonce = inflight_nonce; /* the host may have drained it before the guest saw the completion */
  } else if (!has_want || h->seq > want) {
    add_failure(f, at, "disk-future", "slot=%" PRIu32 " want=%s got=%" PRIu64, i, want_s, h->seq);
    return;
  } else if (h->seq < want) {
    add_failure(f, at, "disk-stale", "slot=%" PRIu32 " want=%s got=%" PRIu64, i, want_s, h->seq);
    return;
  }
  if (h->nonce != nonce) {
    add_failure(f, at, "disk-nonce", "slot=%" PRIu32 " seq=%" PRIu64 " want=%" PRIu64 " got=%" PRIu64, i,
                h->seq, nonce, h->nonce);
    return;
  }
  uint64_t bad = qsnap_fill_mismatch((const uint64_t *)(buf + sizeof *h), QSNAP_REC_BODY_WORDS,
                                     qsnap_record_seed(nonce));
  if (bad < QSNAP_REC_BODY_WORDS || qsnap_checksum(buf) != h->checksum) {
    add_failure(f, at, "disk-pattern", "slot=%" PRIu32 " seq=%" PRIu64 " offset=%zu", i, h->seq,
                bad < QSNAP_REC_BODY_WORDS ? sizeof *h + bad * 8 : offsetof(struct qsnap_rec_hdr, checksum));
  }
}

static bool io_full(bool write, int fd, void *buf, size_t len, off_t off) {
  for (size_t done = 0; done < len;) {
    ssize_t n = write ? pwrite(fd, (uint8_t *)buf + done, len - done, off + done)
                      : pread(fd, (uint8_t *)buf + done, len - done, off + done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += n;
  }
  return true;
}

/* ---- holding the writers at their safe points ------------------------------------ */

static void park(int who) {
  pthread_mutex_lock(&g_mu);
  g_parked[who] = true;
  pthread_cond_broadcast(&g_cv);
  while (atomic_load(&g_hold)) pthread_cond_wait(&g_cv, &g_mu);
  g_parked[who] = false;
  pthread_mutex_unlock(&g_mu);
}

static bool all_parked(void) { return g_parked[W_MEM] && (g_disk_fd < 0 || g_parked[W_DISK] || g_disk_dead); }

static bool hold_writers(void) {
  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += HOLD_TIMEOUT_S;
  pthread_mutex_lock(&g_mu);
  atomic_store(&g_hold, 1);
  while (!all_parked())
    if (pthread_cond_timedwait(&g_cv, &g_mu, &deadline) == ETIMEDOUT) break;
  bool ok = all_parked();
  if (!ok) {
    atomic_store(&g_hold, 0);
    pthread_cond_broadcast(&g_cv);
  }
  pthread_mutex_unlock(&g_mu);
  return ok;
}

static void release_writers(void) {
  pthread_mutex_lock(&g_mu);
  atomic_store(&g_hold, 0);
  pthread_cond_broadcast(&g_cv);
  pthread_mutex_unlock(&g_mu);
}

/* ---- writer threads -------------------------------------------------------------- */

static void *mem_writer(void *arg) {
  (void)arg;
  for (;;) {
    uint64_t prog = atomic_load(&g_mem_progress);
    uint32_t e = prog >> 32, j = (uint32_t)prog;
    if (atomic_load_explicit(&g_hold, memory_order_acquire)) {
      park(W_MEM);
      continue;
    }
    uint32_t p = g_perm[j];
    prewrite_check_page(p, e - 1);
    write_page(p, e, j);
    prog = j + 1 == g_npages ? (uint64_t)(e + 1) << 32 : (uint64_t)e << 32 | (j + 1);
    atomic_store_explicit(&g_mem_progress, prog, memory_order_release);
    atomic_fetch_add_explicit(&g_mem_pages_written, 1, memory_order_relaxed);
  }
  return NULL;
}

static void *disk_writer(void *arg) {
  (void)arg;
  for (;;) {
    if (atomic_load_explicit(&g_hold, memory_order_acquire)) {
      park(W_DISK);
      continue;
    }
    uint64_t s = atomic_load(&g_acked);
    uint32_t i = (uint32_t)(s % g_slots);
    off_t off = (off_t)i * QSNAP_PAGE;
    struct failures f = {0};
    if (!io_full(false, g_disk_fd, g_rbuf, QSNAP_PAGE, off)) {
      add_failure(&f, "write", "disk-io", "slot=%" PRIu32 " op=read errno=%d", i, errno);
    } else {
      check_slot(&f, "write", i, g_rbuf, s, false, 0);
    }
    latch(&f);
    uint64_t nonce = fresh_nonce(s);
    build_record(g_wbuf, s, nonce);
    atomic_store(&g_inflight_nonce, nonce);
    atomic_store(&g_inflight, 1);
    if (!io_full(true, g_disk_fd, g_wbuf, QSNAP_PAGE, off)) {
      struct failures io = {0};
      add_failure(&io, "write", "disk-io", "slot=%" PRIu32 " op=write errno=%d", i, errno);
      latch(&io);
      pthread_mutex_lock(&g_mu); /* stop writing; a hold must not wait for us */
      g_disk_dead = true;
      pthread_cond_broadcast(&g_cv);
      pthread_mutex_unlock(&g_mu);
      return NULL;
    }
    g_slot_nonce[i] = nonce;
    atomic_store(&g_acked, s + 1);
    atomic_store(&g_inflight, 0);
  }
  return NULL;
}

/* ---- commands -------------------------------------------------------------------- */

static bool g_held; /* by a `hold` command */

static void cmd_check(const char *token) {
  if (!g_held && !hold_writers()) {
    emit("QSNAP-ERROR token=%s hold-timeout", token);
    return;
  }
  double t0 = now_s();
  uint64_t prog = atomic_load(&g_mem_progress), acked = atomic_load(&g_acked);
  uint32_t e = prog >> 32, j = (uint32_t)prog;
  bool inflight = atomic_load(&g_inflight);
  uint64_t inflight_nonce = atomic_load(&g_inflight_nonce);
  struct failures f = {0};

  for (uint32_t p = 0; p < g_npages; p++) check_page(&f, p, g_invperm[p] < j ? e : e - 1);

  if (g_disk_fd >= 0) {
    for (uint32_t i0 = 0; i0 < g_slots; i0 += CHECK_CHUNK_SLOTS) {
      uint32_t n = g_slots - i0 < CHECK_CHUNK_SLOTS ? g_slots - i0 : CHECK_CHUNK_SLOTS;
      if (!io_full(false, g_disk_fd, g_check_buf, (size_t)n * QSNAP_PAGE, (off_t)i0 * QSNAP_PAGE)) {
        add_failure(&f, "check", "disk-io", "slot=%" PRIu32 " op=read errno=%d", i0, errno);
        break;
      }
      for (uint32_t k = 0; k < n; k++)
        check_slot(&f, "check", i0 + k, g_check_buf + (size_t)k * QSNAP_PAGE, acked, inflight, inflight_nonce);
    }
  }
  long ms = (long)((now_s() - t0) * 1000 + 0.5);

  pthread_mutex_lock(&g_mu);
  struct failures latched = g_latched;
  pthread_mutex_unlock(&g_mu);
  if (!g_held) release_writers();

  if (f.count == 0 && latched.count == 0) {
    emit("QSNAP-CHECK OK token=%s epoch=%" PRIu32 " page=%" PRIu32 " rec=%" PRIu64 " pages=%" PRIu32
         " slots=%" PRIu32 " ms=%ld",
         token, e, j, acked, g_npages, g_slots, ms);
  } else {
    emit("QSNAP-CHECK FAIL token=%s %s failures=%" PRIu64 " latched=%" PRIu64 " ms=%ld", token,
         f.count ? f.first : latched.first, f.count + latched.count, latched.count, ms);
  }
}

static void emit_held(const char *token) {
  uint64_t prog = atomic_load(&g_mem_progress);
  emit("QSNAP-HELD token=%s epoch=%" PRIu32 " page=%" PRIu32 " rec=%" PRIu64, token, (uint32_t)(prog >> 32),
       (uint32_t)prog, atomic_load(&g_acked));
}

/* Debug: break the invariant behind the writers' backs, so tests can see `check` fail. */
static void cmd_corrupt(const char *token, bool disk, const char *kind) {
  if (!g_held && !hold_writers()) {
    emit("QSNAP-ERROR token=%s hold-timeout", token);
    return;
  }
  uint64_t prog = atomic_load(&g_mem_progress), acked = atomic_load(&g_acked);
  uint32_t j = (uint32_t)prog;
  char what[64] = "";
  if (!disk) {
    uint32_t p = g_perm[(j + g_npages / 2) % g_npages]; /* a page the writer is not near */
    if (!strcmp(kind, "pattern")) {
      page_at(p)[2048] ^= 0x5a;
      snprintf(what, sizeof what, "page=%" PRIu32 " offset=2048", p);
    } else if (!strcmp(kind, "epoch")) {
      ((struct qsnap_page_hdr *)page_at(p))->epoch += 1;
      snprintf(what, sizeof what, "page=%" PRIu32, p);
    }
  } else if (g_disk_fd >= 0 && acked > 0) {
    uint64_t seq = acked - 1;
    bool ok = true;
    if (!strcmp(kind, "nonce")) {
      build_record(g_check_buf, seq, fresh_nonce(seq));
    } else if (!strcmp(kind, "future")) {
      seq = acked;
      build_record(g_check_buf, seq, fresh_nonce(seq));
    } else if (!strcmp(kind, "missing")) {
      memset(g_check_buf, 0, QSNAP_PAGE);
    } else if (!strcmp(kind, "stale") && seq >= g_slots) {
      build_record(g_check_buf, seq - g_slots, fresh_nonce(seq));
    } else if (!strcmp(kind, "pattern")) {
      ok = io_full(false, g_disk_fd, g_check_buf, QSNAP_PAGE, (off_t)(seq % g_slots) * QSNAP_PAGE);
      g_check_buf[2048] ^= 0x5a;
    } else {
      ok = false;
    }
    if (ok && io_full(true, g_disk_fd, g_check_buf, QSNAP_PAGE, (off_t)(seq % g_slots) * QSNAP_PAGE))
      snprintf(what, sizeof what, "slot=%" PRIu64 " seq=%" PRIu64, seq % g_slots, seq);
  }
  if (!g_held) release_writers();
  if (what[0])
    emit("QSNAP-CORRUPTED token=%s kind=%s %s", token, kind, what);
  else
    emit("QSNAP-ERROR token=%s not-applicable", token);
}

static void run_command(char *line) {
  char *save = NULL;
  char *cmd = strtok_r(line, " \t", &save);
  if (!cmd) return;
  char *token = strtok_r(NULL, " \t", &save);
  char *arg = strtok_r(NULL, " \t", &save);
  if (!token) token = "-";

  if (!strcmp(cmd, "check")) {
    cmd_check(token);
  } else if (!strcmp(cmd, "hold")) {
    if (!g_held && !hold_writers()) {
      emit("QSNAP-ERROR token=%s hold-timeout", token);
      return;
    }
    g_held = true;
    emit_held(token);
  } else if (!strcmp(cmd, "release")) {
    if (g_held) release_writers();
    g_held = false;
    emit("QSNAP-RELEASED token=%s", token);
  } else if (!strcmp(cmd, "corrupt-mem") || !strcmp(cmd, "corrupt-disk")) {
    cmd_corrupt(token, cmd[8] == 'd', arg ? arg : (cmd[8] == 'd' ? "nonce" : "pattern"));
  } else {
    emit("QSNAP-ERROR token=%s unknown-command", token);
  }
}

/* ---- setup ----------------------------------------------------------------------- */

static void usage(FILE *out) {
  fprintf(out,
          "usage: qsnap-workload [--mem-mib N] [--disk DEV|none] [--slots N]\n"
          "\n"
          "Rewrites N MiB of memory and a ring of 4 KiB records on a raw block device, and\n"
          "checks on request that both are consistent with its own progress (a snapshot\n"
          "that is not point-in-time breaks that). The disk's contents are destroyed.\n"
          "\n"
          "  --mem-mib N    memory to rewrite, MiB (default 64)\n"
          "  --disk DEV     raw block device or file for the record ring, or none (default none)\n"
          "  --slots N      records in the ring (default 16384; capped by the device size)\n"
          "\n"
          "Commands on stdin, one per line (TOKEN is echoed back, no spaces):\n"
          "  check TOKEN    verify everything  -> QSNAP-CHECK OK|FAIL token=TOKEN ...\n"
          "  hold TOKEN     stop the writers   -> QSNAP-HELD token=TOKEN epoch= page= rec=\n"
          "  release TOKEN  resume them        -> QSNAP-RELEASED token=TOKEN\n"
          "  corrupt-mem TOKEN pattern|epoch, corrupt-disk TOKEN nonce|future|missing|stale|pattern\n"
          "                 (debug: break the invariant on purpose) -> QSNAP-CORRUPTED token=TOKEN ...\n"
          "Output: QSNAP-WORKLOAD READY ..., then QSNAP-HB ... every second.\n");
}

static uint32_t parse_u32(const char *flag, const char *s, uint32_t min, uint32_t max) {
  char *end;
  errno = 0;
  unsigned long v = strtoul(s, &end, 10);
  if (errno || *end || end == s || v < min || v > max) fatal("bad %s '%s' (want %u..%u)", flag, s, min, max);
  return (uint32_t)v;
}

static void *alloc_aligned(size_t len) {
  void *p = NULL;
  if (posix_memalign(&p, QSNAP_PAGE, len)) fatal("out of memory (%zu bytes)", len);
  memset(p, 0, len);
  return p;
}

static void setup_memory(uint32_t mem_mib) {
  g_npages = mem_mib * (1024u * 1024u / QSNAP_PAGE);
  size_t len = (size_t)g_npages * QSNAP_PAGE;
  g_mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (g_mem == MAP_FAILED) fatal("mmap of %" PRIu32 " MiB failed: %s", mem_mib, strerror(errno));
  (void)mlock(g_mem, len); /* best effort: a swapped-out page is still the same page */

  g_perm = calloc(g_npages, sizeof *g_perm);
  g_invperm = calloc(g_npages, sizeof *g_invperm);
  if (!g_perm || !g_invperm) fatal("out of memory");
  uint64_t s = g_run_id ^ 0x7065726dull; /* Fisher-Yates, seeded from the run */
  for (uint32_t i = 0; i < g_npages; i++) g_perm[i] = i;
  for (uint32_t i = g_npages - 1; i > 0; i--) {
    uint32_t k = (uint32_t)(qsnap_splitmix64(&s) % (i + 1));
    uint32_t t = g_perm[i];
    g_perm[i] = g_perm[k];
    g_perm[k] = t;
  }
  for (uint32_t j = 0; j < g_npages; j++) g_invperm[g_perm[j]] = j;

  for (uint32_t j = 0; j < g_npages; j++) write_page(g_perm[j], 0, j);
  atomic_store(&g_mem_progress, (uint64_t)1 << 32); /* (e, j) = (1, 0) */
}

static void setup_disk(const char *path, uint32_t slots) {
  g_disk_fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC);
  if (g_disk_fd < 0) fatal("cannot open %s: %s", path, strerror(errno));
  struct stat st;
  uint64_t bytes = 0;
  if (fstat(g_disk_fd, &st) == 0 && S_ISREG(st.st_mode)) {
    bytes = (uint64_t)st.st_size;
  } else if (ioctl(g_disk_fd, BLKGETSIZE64, &bytes) != 0) {
    fatal("cannot size %s: %s", path, strerror(errno));
  }
  if (bytes / QSNAP_PAGE < slots) slots = (uint32_t)(bytes / QSNAP_PAGE);
  if (slots < 2) fatal("%s is too small (%" PRIu64 " bytes) for a record ring", path, bytes);
  g_disk_name = path;
  g_slots = slots;
  g_slot_nonce = calloc(slots, sizeof *g_slot_nonce);
  g_wbuf = alloc_aligned(QSNAP_PAGE);
  g_rbuf = alloc_aligned(QSNAP_PAGE);
  if (!g_slot_nonce) fatal("out of memory");
}

/* Raw-ish console: no echo, no line editing, no signals; output keeps \n -> \r\n. */
static void setup_tty(void) {
  struct termios t;
  if (!isatty(STDIN_FILENO) || tcgetattr(STDIN_FILENO, &t) != 0) return;
  t.c_lflag &= ~(ECHO | ECHONL | ICANON | ISIG | IEXTEN);
  t.c_iflag &= ~(ICRNL | INLCR | IGNCR | IXON | IXOFF);
  t.c_cc[VMIN] = 1;
  t.c_cc[VTIME] = 0;
  tcsetattr(STDIN_FILENO, TCSANOW, &t);
}

int main(int argc, char **argv) {
  uint32_t mem_mib = 64, slots = 16384;
  const char *disk = "none";
  static const struct option opts[] = {{"mem-mib", required_argument, NULL, 'm'},
                                       {"disk", required_argument, NULL, 'd'},
                                       {"slots", required_argument, NULL, 's'},
                                       {"help", no_argument, NULL, 'h'},
                                       {NULL, 0, NULL, 0}};
  for (int c; (c = getopt_long(argc, argv, "h", opts, NULL)) != -1;) {
    switch (c) {
    case 'm': mem_mib = parse_u32("--mem-mib", optarg, 1, 1u << 20); break;
    case 'd': disk = optarg; break;
    case 's': slots = parse_u32("--slots", optarg, 2, 1u << 26); break;
    case 'h': usage(stdout); return 0;
    default: usage(stderr); return 2;
    }
  }
  if (optind < argc) {
    usage(stderr);
    return 2;
  }

  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&g_cv, &ca);

  setup_tty();
  g_run_id = random64();
  setup_memory(mem_mib);
  if (strcmp(disk, "none") != 0) setup_disk(disk, slots);
  g_check_buf = alloc_aligned((size_t)CHECK_CHUNK_SLOTS * QSNAP_PAGE);

  emit(""); /* the console line may start with the firmware's escape codes: end it */
  emit("QSNAP-WORKLOAD READY run=%016" PRIx64 " mem_mib=%" PRIu32 " pages=%" PRIu32 " disk=%s slots=%" PRIu32,
       g_run_id, mem_mib, g_npages, g_disk_name, g_disk_fd >= 0 ? g_slots : 0);

  pthread_t t;
  if (pthread_create(&t, NULL, mem_writer, NULL)) fatal("cannot start the memory writer");
  if (g_disk_fd >= 0 && pthread_create(&t, NULL, disk_writer, NULL)) fatal("cannot start the disk writer");

  char line[256];
  size_t len = 0;
  bool discarding = false, stdin_open = true, stdin_tty = isatty(STDIN_FILENO);
  uint64_t beat = 0, last_pages = 0, last_acked = 0;
  double last_t = now_s(), next_beat = last_t + 1;
  for (;;) {
    double now = now_s();
    if (now >= next_beat) {
      uint64_t pages = atomic_load(&g_mem_pages_written), acked = atomic_load(&g_acked);
      uint64_t prog = atomic_load(&g_mem_progress);
      double dt = now - last_t;
      pthread_mutex_lock(&g_mu);
      uint64_t bad = g_latched.count;
      pthread_mutex_unlock(&g_mu);
      emit("QSNAP-HB n=%" PRIu64 " epoch=%" PRIu32 " page=%" PRIu32 " rec=%" PRIu64
           " mem_mibps=%.0f disk_iops=%.0f bad=%" PRIu64,
           ++beat, (uint32_t)(prog >> 32), (uint32_t)prog, acked,
           (pages - last_pages) * (double)QSNAP_PAGE / (1 << 20) / dt, (acked - last_acked) / dt, bad);
      last_pages = pages, last_acked = acked, last_t = now;
      next_beat = now + 1;
    }
    struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
    int timeout_ms = (int)((next_beat - now) * 1000) + 1;
    if (!stdin_open) {
      poll(NULL, 0, timeout_ms);
      continue;
    }
    if (poll(&pfd, 1, timeout_ms) <= 0) continue;
    char buf[256];
    ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
    if (n == 0 && !stdin_tty) return 0; /* a pipe closed: a run on a development host */
    if (n <= 0) {
      if (n == 0 || (errno != EINTR && errno != EAGAIN)) stdin_open = false;
      continue;
    }
    for (ssize_t k = 0; k < n; k++) {
      char c = buf[k];
      if (c == '\n' || c == '\r') {
        line[len] = 0;
        if (!discarding && len) run_command(line);
        len = 0, discarding = false;
      } else if (len + 1 < sizeof line) {
        line[len++] = c;
      } else {
        discarding = true; /* an overlong line is noise, not a command */
      }
    }
  }
}
