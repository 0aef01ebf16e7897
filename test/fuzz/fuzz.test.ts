/**
 * The fuzzer over qsnap's readers of untrusted bytes: real fixtures mutated (mutate.ts), each
 * execution ending in success or a coded error (targets.ts). In make test a short run from a
 * fixed seed; `make fuzz` gives it FUZZ_MINUTES and a fresh seed (FUZZ_SEED replays one).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  bundleFixture,
  type Fixture,
  qcow2Fixture,
  type SnapshotFixture,
  snapshotFixture,
  streamFixtures,
} from './fixtures.js';
import { budgetFromEnv, type FuzzStats, formatStats, fuzz } from './runner.js';
import {
  bundleTarget,
  type FuzzTarget,
  fileTarget,
  manifestTarget,
  qcow2Target,
  streamTarget,
} from './targets.js';

/** Executions per target in make test (fixed seed): together well under 30 s on this machine. */
const FIXED: Record<string, { seed: number; numRuns: number }> = {
  stream: { seed: 12, numRuns: 300 },
  'snapshot-file': { seed: 12, numRuns: 120 },
  manifest: { seed: 12, numRuns: 600 },
  bundle: { seed: 12, numRuns: 1500 },
  qcow2: { seed: 12, numRuns: 3000 },
};
const TARGETS = Object.keys(FIXED).length;
const minutes = Number(process.env['FUZZ_MINUTES'] ?? 0);
const timeout = minutes > 0 ? (minutes * 60_000) / TARGETS + 120_000 : 120_000;

describe('fuzz: mutated real inputs give only coded errors', () => {
  let streams: Fixture[];
  let snapshot: SnapshotFixture;
  let qcow2: Fixture;
  const all: FuzzStats[] = [];

  beforeAll(async () => {
    streams = streamFixtures();
    snapshot = await snapshotFixture();
    qcow2 = qcow2Fixture(snapshot.dir);
  });

  afterAll(async () => {
    await snapshot?.dispose();
    const total = all.reduce((n, s) => n + s.executions, 0);
    console.log(`fuzz: ${total} executions over ${all.length} targets`);
  });

  async function check<I>(target: FuzzTarget<I>): Promise<void> {
    const stats = await fuzz(target, budgetFromEnv(TARGETS, FIXED[target.name]!));
    all.push(stats);
    console.log(formatStats(stats));
    if (process.env['FUZZ_VERBOSE'] === '1')
      console.log('slowest:', JSON.stringify(stats.slowest).slice(0, 2000));
    if (stats.finding)
      console.log(`finding in ${target.name}:`, JSON.stringify(stats.finding).slice(0, 4000));
    expect(stats.finding, `${target.name} (seed ${stats.seed})`).toBeUndefined();
    // Negative control of the verdicts: the mutations reach both sides of the checks.
    expect(stats.outcomes['ok'] ?? 0, 'some mutated inputs still parse').toBeGreaterThan(0);
    expect(Object.keys(stats.outcomes).length, 'and some are refused').toBeGreaterThan(1);
  }

  it('the migration stream parser', { timeout }, () => check(streamTarget(streams)));
  it('the snapshot file reader (head, regions, pages, verify)', { timeout }, () =>
    check(fileTarget(snapshot)),
  );
  it('the manifest parser', { timeout }, () => check(manifestTarget(snapshot.manifest)));
  it('the bundle container and its disk headers', { timeout }, () =>
    check(bundleTarget(bundleFixture(snapshot.meta, qcow2.bytes))),
  );
  it('the qcow2 header reader', { timeout }, () => check(qcow2Target(qcow2)));
});
