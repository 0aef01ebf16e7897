import type { PrecopyTuning } from './types.js';

/**
 * live-precopy's defaults, measured on the bundled test guest (docs/benchmarks.md): QEMU's own
 * 300 ms downtime limit lets the busy guest converge in 3–4 passes with a 125–250 ms pause;
 * lower limits did not shorten the pause below ~70 ms (the final bitmap sync, the freeze, the
 * device state, the resume) but needed auto-converge, seconds of throttled guest and 4–10× the
 * stream. auto-converge stays on for guests that dirty RAM faster than it is sent (it did not
 * throttle the converging guest). The limit doubles every `raiseAfterMs` (with --max-bandwidth
 * QEMU estimates the pause at the capped rate, though it sends the rest uncapped), and at
 * `forceAfterMs` it is set so high that QEMU switches over at its next check whatever is left:
 * every guest finishes, paused as long as sending its dirty RAM takes.
 */
export const PRECOPY_DEFAULTS: Required<PrecopyTuning> = {
  downtimeLimitMs: 300,
  autoConverge: true,
  raiseAfterMs: 5_000,
  forceAfterMs: 30_000,
};

/** QEMU's largest downtime-limit (migration/options.c MAX_MIGRATE_DOWNTIME: 2000 s). */
export const MAX_DOWNTIME_LIMIT_MS = 2_000_000;

export function precopyTuning(given: PrecopyTuning | undefined): Required<PrecopyTuning> {
  return { ...PRECOPY_DEFAULTS, ...given };
}

/** The downtime limit `elapsedMs` after `migrate`: doubled every raiseAfterMs, then forced. */
export function downtimeLimitAt(tuning: Required<PrecopyTuning>, elapsedMs: number): number {
  if (elapsedMs >= tuning.forceAfterMs) return MAX_DOWNTIME_LIMIT_MS;
  const raises = Math.floor(elapsedMs / tuning.raiseAfterMs);
  return Math.min(tuning.downtimeLimitMs * 2 ** raises, MAX_DOWNTIME_LIMIT_MS);
}
