/**
 * Every finding of the fuzzer, replayed: regressions/<target>-<hash>.json holds the shrunk
 * input (written by `make fuzz` with FUZZ_SAVE=1) and, once fixed, the outcome it must give.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  bundleFixture,
  type Fixture,
  qcow2Fixture,
  type SnapshotFixture,
  snapshotFixture,
  streamFixtures,
} from './fixtures.js';
import { REGRESSIONS } from './runner.js';
import {
  bundleTarget,
  type FuzzTarget,
  fileTarget,
  manifestTarget,
  qcow2Target,
  streamTarget,
} from './targets.js';

interface Regression {
  target: string;
  error: string;
  fixed?: string;
  expect?: string;
  input: unknown;
}

const files = readdirSync(REGRESSIONS)
  .filter((f) => f.endsWith('.json'))
  .sort();

describe('fuzz regressions', () => {
  let snapshot: SnapshotFixture;
  let targets: Record<string, FuzzTarget<unknown>>;

  beforeAll(async () => {
    snapshot = await snapshotFixture();
    const qcow2: Fixture = qcow2Fixture(snapshot.dir);
    const list = [
      streamTarget(streamFixtures()),
      fileTarget(snapshot),
      manifestTarget(snapshot.manifest),
      bundleTarget(bundleFixture(snapshot.meta, qcow2.bytes)),
      qcow2Target(qcow2),
    ] as FuzzTarget<unknown>[];
    targets = Object.fromEntries(list.map((t) => [t.name, t]));
  });

  afterAll(() => snapshot?.dispose());

  it('has at least one finding to replay', () => {
    expect(files.length).toBeGreaterThan(0);
  });

  it.each(files)('%s gives a coded outcome', async (file) => {
    const r = JSON.parse(readFileSync(join(REGRESSIONS, file), 'utf8')) as Regression;
    const target = targets[r.target];
    expect(target, `target ${r.target}`).toBeDefined();
    const outcome = await target!.run(r.input);
    if (r.expect) expect(outcome).toBe(r.expect);
  });
});
